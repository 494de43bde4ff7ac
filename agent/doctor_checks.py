"""`edge-agent doctor`'s host checks: board, CPU, memory, temperatures, accelerators (CUDA,
TensorRT, Coral, TFLite GPU), cameras and serial ports, all read under a configurable root.

Each check is a `Check`: status ok / warn / fail / absent and a one-line detail.
"""

from __future__ import annotations

import enum
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.telemetry import SystemProbe
from runtimes.hardware import library_loads

CommandRunner = Callable[[Sequence[str]], "str | None"]


class Status(str, enum.Enum):
    OK = "ok"
    WARN = "warn"  # works, but something needs attention
    FAIL = "fail"  # the agent cannot work like this
    ABSENT = "absent"  # not there; fine unless you need it


@dataclass(frozen=True)
class Check:
    section: str
    name: str
    status: Status
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "name": self.name,
            "status": self.status.value,
            "detail": self.detail,
            "data": self.data,
        }


LIB_DIRS = (
    "usr/lib/aarch64-linux-gnu/tegra",
    "usr/lib/aarch64-linux-gnu/nvidia",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "usr/local/cuda/lib64",
    "usr/local/cuda/targets/aarch64-linux/lib",
    "usr/lib64",
    "usr/lib",
    "usr/local/lib",
    "lib",
)
BIN_DIRS = ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin")
CORAL_USB = {
    ("1a6e", "089a"): "Coral USB Accelerator (not yet initialised: the runtime loads it)",
    ("18d1", "9302"): "Coral USB Accelerator",
}
ARM_PARTS = {  # /proc/cpuinfo "CPU part" of ARM Ltd cores
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd41": "Cortex-A78",
    "0xd42": "Cortex-A78AE",
}
THROTTLE_BITS = {  # vcgencmd get_throttled
    0: "under-voltage",
    1: "ARM frequency capped",
    2: "throttled",
    3: "soft temperature limit",
}
SERIAL_GLOBS = ("ttyUSB*", "ttyACM*", "ttyTHS*", "ttyAMA*", "serial0", "serial1")
TEMP_WARN_C = 80.0
TEMP_FAIL_C = 95.0
LOW_MEMORY_MB = 256


def run_command(argv: Sequence[str]) -> str | None:
    """stdout of a short command, or None when it is missing, fails or hangs."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=3)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


class Host:
    """The machine as seen under `root` ("/" for real; a fake tree in tests)."""

    def __init__(self, root: Path = Path("/"), run: CommandRunner = run_command) -> None:
        self.root = root
        self.live = root.resolve() == Path("/")
        self._run = run

    def path(self, relative: str) -> Path:
        return self.root / relative.lstrip("/")

    def read(self, relative: str) -> str | None:
        try:
            return self.path(relative).read_bytes().rstrip(b"\0\n").decode(errors="replace")
        except OSError:
            return None

    def which(self, command: str) -> str | None:
        if self.live:
            return shutil.which(command)
        for folder in BIN_DIRS:
            candidate = self.path(folder) / command
            if candidate.is_file():
                return str(candidate)
        return None

    def command(self, argv: Sequence[str]) -> str | None:
        """Run a command only on the real machine (a fake tree has nothing to run)."""
        return self._run(argv) if self.live else None

    def library(self, names: Sequence[str]) -> str | None:
        """Where a shared library is: its file under the root, or loadable by soname."""
        for folder in LIB_DIRS:
            base = self.path(folder)
            for name in names:
                found = sorted(base.glob(f"{name}*")) if base.is_dir() else []
                if found:
                    return str(found[0])
        if self.live:
            for name in names:
                if library_loads(name):
                    return name
        return None

    def probe(self) -> SystemProbe:
        return SystemProbe(proc=self.path("proc"), sys=self.path("sys"))


# --- platform -----------------------------------------------------------------------


def board_info(host: Host) -> dict[str, Any]:
    """The `platform` block of the report: what runtimes.hardware.board() gives, per root."""
    info: dict[str, Any] = {
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "cpus": _cpu_count(host),
    }
    model = host.read("proc/device-tree/model")
    if model:
        info["model"] = model
    release = host.read("etc/nv_tegra_release")
    if release:
        info["l4t"] = release.splitlines()[0]
    return info


def l4t_version(release: str) -> str | None:
    """ "# R36 (release), REVISION: 3.0, ..." -> "36.3.0"."""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", release)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def board_check(host: Host) -> Check:
    model = host.read("proc/device-tree/model")
    release = host.read("etc/nv_tegra_release")
    if release is not None or (model and "jetson" in model.lower()):
        version = l4t_version(release or "")
        data = {"kind": "jetson", "model": model, "l4t": version}
        if version is None:
            why = "missing" if release is None else "unreadable"
            return Check(
                "platform",
                "board",
                Status.WARN,
                f"{model or 'NVIDIA Jetson'}, L4T release unknown (/etc/nv_tegra_release {why})",
                data,
            )
        return Check("platform", "board", Status.OK, f"{model or 'Jetson'}, L4T {version}", data)
    if model and model.startswith("Raspberry Pi"):
        return Check(
            "platform", "board", Status.OK, model, {"kind": "raspberry-pi", "model": model}
        )
    detail = f"{model or 'generic'} {platform.machine()} {platform.system()}".strip()
    return Check(
        "platform",
        "board",
        Status.OK,
        f"{detail} (no Jetson or Raspberry Pi found)",
        {"kind": "generic", "model": model},
    )


def throttling_check(host: Host) -> Check | None:
    """Raspberry Pi firmware's under-voltage/throttling flags; None on other boards."""
    model = host.read("proc/device-tree/model") or ""
    if not model.startswith("Raspberry Pi"):
        return None
    raw, source = None, ""
    if host.which("vcgencmd"):
        raw, source = host.command(["vcgencmd", "get_throttled"]), "vcgencmd"
    if raw is None:
        raw = host.read("sys/devices/platform/soc/soc:firmware/get_throttled")
        source = "sysfs"
    if raw is None:
        return Check(
            "platform", "throttling", Status.ABSENT, "no vcgencmd and no firmware sysfs node"
        )
    try:
        value = int(raw.strip().removeprefix("throttled=").removeprefix("0x"), 16)
    except ValueError:
        return Check(
            "platform", "throttling", Status.WARN, f"cannot parse {raw.strip()!r} ({source})"
        )
    now = [name for bit, name in THROTTLE_BITS.items() if value & (1 << bit)]
    since = [name for bit, name in THROTTLE_BITS.items() if value & (1 << (bit + 16))]
    data = {"value": f"{value:#x}", "now": now, "since_boot": since, "source": source}
    if not value:
        return Check(
            "platform", "throttling", Status.OK, "0x0: no under-voltage or throttling", data
        )
    parts = [f"now: {', '.join(now)}"] if now else []
    parts += [f"since boot: {', '.join(since)}"] if since else []
    hint = "; check the power supply" if "under-voltage" in now + since else ""
    return Check(
        "platform", "throttling", Status.WARN, f"{value:#x}: {'; '.join(parts)}{hint}", data
    )


def _cpu_count(host: Host) -> int | None:
    text = host.read("proc/cpuinfo")
    if text is None:
        return os.cpu_count() if host.live else None
    count = sum(1 for line in text.splitlines() if re.match(r"processor\s*:", line))
    return count or (os.cpu_count() if host.live else None)


def cpu_check(host: Host) -> Check:
    text = host.read("proc/cpuinfo")
    if text is None:
        return Check("platform", "cpu", Status.ABSENT, "/proc/cpuinfo not readable")
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), []).append(value.strip())
    count = _cpu_count(host) or 0
    if "model name" in fields:
        name = fields["model name"][0]
    else:
        parts = sorted({ARM_PARTS.get(p.lower(), f"part {p}") for p in fields.get("CPU part", [])})
        name = " + ".join(parts) or (fields.get("Hardware") or ["unknown CPU"])[0]
    return Check("platform", "cpu", Status.OK, f"{count} x {name}", {"count": count, "model": name})


def memory_check(host: Host) -> Check:
    memory = host.probe().memory()
    if not memory["total_mb"]:
        return Check("platform", "memory", Status.ABSENT, "/proc/meminfo not readable")
    detail = f"{memory['available_mb']} MiB available of {memory['total_mb']} MiB"
    if memory["available_mb"] < LOW_MEMORY_MB:
        return Check("platform", "memory", Status.WARN, f"{detail}: low for a model", memory)
    return Check("platform", "memory", Status.OK, detail, memory)


def temperature_check(host: Host) -> Check:
    temps = host.probe().temperatures()
    if not temps:
        return Check("platform", "temperature", Status.ABSENT, "no thermal zones")
    hottest = max(temps, key=lambda k: temps[k])
    detail = ", ".join(f"{k} {v:.1f}°C" for k, v in sorted(temps.items()))
    status = Status.OK
    if temps[hottest] >= TEMP_FAIL_C:
        status, detail = Status.FAIL, f"{hottest} at {temps[hottest]:.1f}°C (throttling): {detail}"
    elif temps[hottest] >= TEMP_WARN_C:
        status, detail = Status.WARN, f"{hottest} at {temps[hottest]:.1f}°C: {detail}"
    return Check("platform", "temperature", status, detail, {"celsius": temps})


# --- accelerators -------------------------------------------------------------------


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def _tensorrt_package() -> tuple[str, str] | None:
    for name in ("tensorrt", "tensorrt-cu12", "tensorrt-cu11"):
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if importlib.util.find_spec("tensorrt") is not None:
        return "tensorrt", "(no version metadata)"  # JetPack's python3-libnvinfer
    return None


def cuda_check(host: Host) -> Check:
    lib = host.library(["libcuda.so"])
    smi = host.which("nvidia-smi")
    data = {"libcuda": lib, "nvidia_smi": smi}
    if lib:
        extra = f", nvidia-smi at {smi}" if smi else ""
        return Check("accelerators", "cuda", Status.OK, f"libcuda at {lib}{extra}", data)
    if smi:
        return Check(
            "accelerators",
            "cuda",
            Status.WARN,
            f"nvidia-smi at {smi} but no libcuda: driver incomplete?",
            data,
        )
    return Check("accelerators", "cuda", Status.ABSENT, "no libcuda, no nvidia-smi", data)


def tensorrt_check(host: Host) -> Check:
    lib = host.library(["libnvinfer.so"])
    package = _tensorrt_package()
    data = {
        "libnvinfer": lib,
        "package": package[0] if package else None,
        "version": package[1] if package else None,
    }
    if lib and package:
        return Check(
            "accelerators",
            "tensorrt",
            Status.OK,
            f"{package[0]} {package[1]}, libnvinfer at {lib}",
            data,
        )
    if lib:
        return Check(
            "accelerators",
            "tensorrt",
            Status.WARN,
            f"libnvinfer at {lib} but no tensorrt Python package in this environment"
            " (JetPack: make the venv with --system-site-packages)",
            data,
        )
    if package:
        return Check(
            "accelerators",
            "tensorrt",
            Status.WARN,
            f"{package[0]} {package[1]} installed but libnvinfer not found",
            data,
        )
    return Check(
        "accelerators", "tensorrt", Status.ABSENT, "no libnvinfer, no tensorrt package", data
    )


def coral_check(host: Host) -> Check:
    found: list[str] = []
    usb = host.path("sys/bus/usb/devices")
    for device in sorted(usb.glob("*")) if usb.is_dir() else []:
        vendor, product = (_text(device / name).lower() for name in ("idVendor", "idProduct"))
        if (vendor, product) in CORAL_USB:
            found.append(f"USB {vendor}:{product} {CORAL_USB[vendor, product]}")
    if host.path("dev/apex_0").exists():
        found.append("PCIe /dev/apex_0")
    lib = host.library(["libedgetpu.so.1", "libedgetpu.so"])
    data = {"devices": found, "libedgetpu": lib}
    if found and lib:
        return Check(
            "accelerators", "coral", Status.OK, f"{'; '.join(found)}; libedgetpu at {lib}", data
        )
    if found:
        return Check(
            "accelerators",
            "coral",
            Status.WARN,
            f"{'; '.join(found)} but libedgetpu is not installed (apt-get install libedgetpu1-std)",
            data,
        )
    if lib:
        return Check(
            "accelerators", "coral", Status.ABSENT, f"libedgetpu at {lib}, no Coral device", data
        )
    return Check("accelerators", "coral", Status.ABSENT, "no Coral device, no libedgetpu", data)


def tflite_gpu_check(host: Host) -> Check:
    lib = host.library(["libtensorflowlite_gpu_delegate.so"])
    if lib:
        return Check(
            "accelerators", "tflite-gpu", Status.OK, f"GPU delegate at {lib}", {"library": lib}
        )
    return Check(
        "accelerators",
        "tflite-gpu",
        Status.ABSENT,
        "no libtensorflowlite_gpu_delegate.so",
        {"library": None},
    )


# --- devices ------------------------------------------------------------------------


def _access(host: Host, path: Path) -> bool:
    return not host.live or os.access(path, os.R_OK | os.W_OK)


def camera_check(host: Host) -> Check:
    devices = sorted(host.path("dev").glob("video*"), key=lambda p: (len(p.name), p.name))
    if not devices:
        return Check("devices", "cameras", Status.ABSENT, "no /dev/video*", {"devices": []})
    items: list[dict[str, Any]] = []
    for dev in devices:
        name = host.read(f"sys/class/video4linux/{dev.name}/name")
        items.append({"device": f"/dev/{dev.name}", "name": name, "access": _access(host, dev)})
    detail = ", ".join(f"{i['device']} ({i['name'] or '?'})" for i in items)
    denied = [i["device"] for i in items if not i["access"]]
    if denied:
        return Check(
            "devices",
            "cameras",
            Status.WARN,
            f"{detail}; no access to {', '.join(denied)}: add the user to the video group",
            {"devices": items},
        )
    return Check("devices", "cameras", Status.OK, detail, {"devices": items})


def serial_check(host: Host) -> Check:
    dev = host.path("dev")
    ports = sorted({p for pattern in SERIAL_GLOBS for p in dev.glob(pattern)})
    if not ports:
        return Check("devices", "serial", Status.ABSENT, "no serial ports", {"ports": []})
    items: list[dict[str, Any]] = []
    for port in ports:
        target = os.readlink(port) if port.is_symlink() else None
        items.append({"device": f"/dev/{port.name}", "link": target, "access": _access(host, port)})
    detail = ", ".join(i["device"] + (f" -> {i['link']}" if i["link"] else "") for i in items)
    denied = [i["device"] for i in items if not i["access"]]
    if denied:
        return Check(
            "devices",
            "serial",
            Status.WARN,
            f"{detail}; no access to {', '.join(denied)}: add the user to the dialout group",
            {"ports": items},
        )
    return Check("devices", "serial", Status.OK, detail, {"ports": items})


def host_checks(host: Host) -> list[Check]:
    checks = [board_check(host), throttling_check(host), cpu_check(host), memory_check(host)]
    checks += [temperature_check(host), cuda_check(host), tensorrt_check(host)]
    checks += [coral_check(host), tflite_gpu_check(host), camera_check(host), serial_check(host)]
    return [c for c in checks if c is not None]

"""What this machine offers the runtimes: installed interpreters, ONNX Runtime execution
providers, TFLite delegate libraries, and the board it runs on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DELEGATE_CANDIDATES = {
    "edgetpu": ["libedgetpu.so.1", "libedgetpu.so"],
    "gpu": ["libtensorflowlite_gpu_delegate.so"],
}


@dataclass
class RuntimeReport:
    name: str
    package: str | None
    version: str | None
    detail: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_loads(name: str) -> bool:
    """True when the dynamic loader can open `name` (by soname or path)."""
    candidates = [name]
    found = ctypes.util.find_library(name.removeprefix("lib").split(".so")[0])
    if found:
        candidates.append(found)
    for candidate in candidates:
        try:
            ctypes.CDLL(candidate)
            return True
        except OSError:
            continue
    return False


def tflite_report() -> RuntimeReport:
    for package in ("ai-edge-litert", "tflite-runtime"):
        version = _version(package)
        if version is None:
            continue
        try:
            from runtimes.tflite import import_interpreter

            _, used = import_interpreter()
        except Exception as exc:
            return RuntimeReport("tflite", package, version, error=str(exc))
        delegates = {
            kind: any(library_loads(lib) for lib in libs)
            for kind, libs in DELEGATE_CANDIDATES.items()
        }
        return RuntimeReport(
            "tflite", used, _version(used), {"xnnpack": True, "delegates": delegates}
        )
    return RuntimeReport(
        "tflite", None, None, error="not installed: pip install 'edge-agent[tflite]'"
    )


def onnx_report() -> RuntimeReport:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return RuntimeReport(
            "onnx", None, None, error=f"not installed ({exc}): pip install 'edge-agent[onnx]'"
        )
    package = next(
        (p for p in ("onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime") if _version(p)),
        "onnxruntime",
    )
    return RuntimeReport(
        "onnx",
        package,
        ort.__version__,
        {"providers": list(ort.get_available_providers()), "device": ort.get_device()},
    )


def tensorrt_report() -> RuntimeReport:
    version = _version("tensorrt") or _version("tensorrt-cu12")
    if version is None:
        return RuntimeReport(
            "tensorrt", None, None, error="not installed (JetPack ships it; pip install tensorrt)"
        )
    return RuntimeReport("tensorrt", "tensorrt", version)


def board() -> dict[str, Any]:
    """The platform in a few fields (Jetson/Raspberry Pi model when the device tree says)."""
    info: dict[str, Any] = {
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    model = Path("/proc/device-tree/model")
    if model.is_file():
        info["model"] = model.read_bytes().rstrip(b"\0").decode(errors="replace")
    release = Path("/etc/nv_tegra_release")
    if release.is_file():
        info["l4t"] = release.read_text(errors="replace").splitlines()[0]
    return info


def runtime_reports() -> list[RuntimeReport]:
    return [tflite_report(), onnx_report(), tensorrt_report()]


def as_dict(reports: list[RuntimeReport]) -> list[dict[str, Any]]:
    return [asdict(r) for r in reports]

"""The systemd unit, tmpfiles.d and sysusers.d files and the installer: the settings the
daemon relies on, `systemd-analyze verify`/`security` where systemd-analyze exists, the
files applied offline to a scratch root, and install.sh's plan (--dry-run) and real runs
under --prefix.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import MqttConfig
from agent.sdnotify import Notifier

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "edge-agent.service"
INSTALL = SYSTEMD / "install.sh"
SYSUSERS_REL = "etc/sysusers.d/edge-agent.conf"  # where install.sh puts them, under --prefix
TMPFILES_REL = "etc/tmpfiles.d/edge-agent.conf"

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """Sections to (key, value) in file order; repeated keys kept, as systemd reads them."""
    sections: Unit = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not key=value: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT.read_text())


def values(unit: Unit, section: str, key: str) -> list[str]:
    """Every assignment of key; an empty one resets the list, as in systemd."""
    out: list[str] = []
    for k, v in unit.get(section, []):
        if k == key:
            out = [] if v == "" else [*out, v]
    return out


def value(unit: Unit, section: str, key: str) -> str | None:
    """The last assignment (the one systemd uses), or None when the key is absent."""
    found = [v for k, v in unit.get(section, []) if k == key]
    return found[-1] if found else None


def seconds(text: str | None) -> float:
    assert text is not None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", text)
    assert match, text
    return float(match[1]) * (60 if match[2] in ("min", "m") else 1)


# --- the unit -------------------------------------------------------------------------


def test_service_lifecycle(unit: Unit) -> None:
    assert set(unit) == {"Unit", "Service", "Install"}
    assert value(unit, "Service", "Type") == "notify"
    assert value(unit, "Service", "NotifyAccess") == "main"
    assert (
        value(unit, "Service", "ExecStart")
        == "/opt/edge-agent/bin/edge-agent run --config /etc/edge-agent/agent.toml"
    )
    assert seconds(value(unit, "Service", "WatchdogSec")) == 30
    assert value(unit, "Service", "Restart") == "on-failure"
    assert seconds(value(unit, "Service", "RestartSec")) == 5
    assert value(unit, "Service", "KillMode") == "mixed"
    # The start limit belongs in [Unit]; systemd ignores it in [Service] since v230.
    assert int(value(unit, "Unit", "StartLimitBurst") or 0) >= 3
    assert seconds(value(unit, "Unit", "StartLimitIntervalSec")) >= 60
    assert value(unit, "Service", "StartLimitBurst") is None
    assert value(unit, "Install", "WantedBy") == "multi-user.target"


def test_stop_timeout_covers_the_outbox_flush(unit: Unit) -> None:
    flush = MqttConfig.model_fields["flush_timeout_s"].default
    assert seconds(value(unit, "Service", "TimeoutStopSec")) >= flush + 10


def test_watchdog_is_fed_twice_per_period(unit: Unit) -> None:
    """What systemd hands the agent for WatchdogSec=30 makes it ping every 15 s."""
    usec = int(seconds(value(unit, "Service", "WatchdogSec")) * 1_000_000)
    notifier = Notifier({"WATCHDOG_USEC": str(usec), "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval_s == 15.0


def test_identity_and_directories(unit: Unit) -> None:
    assert value(unit, "Service", "User") == "edge-agent"
    assert value(unit, "Service", "Group") == "edge-agent"
    groups = " ".join(values(unit, "Service", "SupplementaryGroups")).split()
    assert {"video", "dialout", "plugdev"} <= set(groups)
    assert value(unit, "Service", "StateDirectory") == "edge-agent"
    assert value(unit, "Service", "StateDirectoryMode") == "0750"
    assert value(unit, "Service", "ConfigurationDirectory") == "edge-agent"
    assert value(unit, "Service", "RuntimeDirectory") == "edge-agent"
    assert value(unit, "Service", "LogsDirectory") is None  # the journal
    environment = " ".join(values(unit, "Service", "Environment")).split()
    assert "PYTHONUNBUFFERED=1" in environment
    assert not any(v.startswith("OMP_NUM_THREADS=") for v in environment)


HARDENING_ON = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "DevicePolicy": "closed",
}


def test_hardening(unit: Unit) -> None:
    for key, expected in HARDENING_ON.items():
        assert value(unit, "Service", key) == expected, key
    # JIT (ONNX Runtime, XNNPACK) and CUDA need W+X pages; cameras need the real /dev.
    assert value(unit, "Service", "MemoryDenyWriteExecute") in (None, "no")
    assert value(unit, "Service", "PrivateDevices") in (None, "no")
    assert value(unit, "Service", "CapabilityBoundingSet") == ""
    assert value(unit, "Service", "AmbientCapabilities") == ""
    families = " ".join(values(unit, "Service", "RestrictAddressFamilies")).split()
    assert set(families) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    filters = values(unit, "Service", "SystemCallFilter")
    assert filters[0] == "@system-service"
    # Thread pinning (ONNX Runtime, OpenMP) and CUDA's NUMA calls live in @resources.
    assert not any("@resources" in f for f in filters)


def test_device_allow_list(unit: Unit) -> None:
    allowed = values(unit, "Service", "DeviceAllow")
    for entry in (
        "char-video4linux rw",
        "char-ttyUSB rw",
        "char-ttyACM rw",
        "char-ttyTHS rw",
        "char-usb_device rw",
        "/dev/nvmap rw",
        "/dev/nvhost-ctrl rw",
        "/dev/nvhost-ctrl-gpu rw",
    ):
        assert entry in allowed, entry
    for entry in allowed:
        spec, _, access = entry.partition(" ")
        assert re.fullmatch(r"[rwm]{1,3}", access), entry
        # systemd never globs paths: a /dev/video* entry would silently allow nothing.
        assert spec.startswith(("char-", "block-")) or (
            spec.startswith("/dev/") and "*" not in spec and "?" not in spec
        ), entry


def _verifiable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at a stub (verify insists the binary exists)."""
    stub = tmp_path / "edge-agent"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert "ExecStart=/opt/edge-agent/bin/edge-agent " in text
    copy = tmp_path / "edge-agent.service"
    copy.write_text(text.replace("ExecStart=/opt/edge-agent/bin/edge-agent ", f"ExecStart={stub} "))
    return copy


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    copy = _verifiable_copy(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown keys and bad values are warnings that name the file, with rc still 0.
    complaints = [line for line in output.splitlines() if copy.name in line]
    assert not complaints, "\n".join(complaints)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_security_exposure(tmp_path: Path) -> None:
    copy = _verifiable_copy(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in result.stderr or "unrecognized option" in result.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd 250 or newer")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    # 10 is unprotected; the unit sits near 2. Losing a hardening option shows up here.
    assert float(match[1]) <= 3.0, result.stdout


# --- tmpfiles.d and sysusers.d --------------------------------------------------------


def config_lines(path: Path) -> list[list[str]]:
    return [
        shlex.split(line)
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_tmpfiles_lines() -> None:
    entries = {fields[1]: fields for fields in config_lines(SYSTEMD / "edge-agent.tmpfiles")}
    assert entries["/var/lib/edge-agent"][:5] == [
        "d",
        "/var/lib/edge-agent",
        "0750",
        "edge-agent",
        "edge-agent",
    ]
    assert entries["/var/lib/edge-agent/models"][0] == "d"
    assert entries["/etc/edge-agent"][:5] == ["d", "/etc/edge-agent", "0750", "root", "edge-agent"]


def test_sysusers_lines(unit: Unit) -> None:
    entries = config_lines(SYSTEMD / "edge-agent.sysusers")
    users = [e for e in entries if e[0] == "u"]
    assert len(users) == 1 and users[0][1] == "edge-agent"
    # Home is the state directory, the one place the unit lets it write.
    assert users[0][4] == "/var/lib/" + (value(unit, "Service", "StateDirectory") or "")
    members = {e[2] for e in entries if e[0] == "m" and e[1] == "edge-agent"}
    assert {"video", "dialout", "plugdev"} <= members


@pytest.mark.skipif(
    not (shutil.which("systemd-sysusers") and shutil.which("systemd-tmpfiles")),
    reason="systemd-sysusers/systemd-tmpfiles not installed",
)
@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles needs root to set owners")
def test_sysusers_and_tmpfiles_apply_to_a_scratch_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc" / "edge-agent").mkdir(parents=True)
    config = root / "etc" / "edge-agent" / "agent.toml"
    config.write_text("")
    config.chmod(0o644)
    subprocess.run(
        ["systemd-sysusers", f"--root={root}", str(SYSTEMD / "edge-agent.sysusers")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    group = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/group").read_text().splitlines()
    }
    user = passwd["edge-agent"]
    uid, gid = int(user[2]), int(user[3])
    assert user[5] == "/var/lib/edge-agent"
    for name in ("video", "dialout", "plugdev"):
        assert "edge-agent" in group[name][3].split(","), name
    subprocess.run(
        ["systemd-tmpfiles", f"--root={root}", "--create", str(SYSTEMD / "edge-agent.tmpfiles")],
        check=True,
        capture_output=True,
        timeout=60,
    )

    def owner_mode(path: Path) -> tuple[int, int, int]:
        st = path.stat()
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

    assert owner_mode(root / "var/lib/edge-agent") == (uid, gid, 0o750)
    assert owner_mode(root / "var/lib/edge-agent/models") == (uid, gid, 0o750)
    assert owner_mode(root / "etc/edge-agent") == (0, gid, 0o750)
    assert owner_mode(config) == (0, gid, 0o640)


# --- install.sh -----------------------------------------------------------------------


def run_install(*args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    command = ["bash", str(INSTALL), *args]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def planned(output: str) -> list[list[str]]:
    """The commands install.sh printed (`+ cmd ...`, shell-quoted)."""
    return [shlex.split(line[2:]) for line in output.splitlines() if line.startswith("+ ")]


def test_install_sh_parses() -> None:
    subprocess.run(["bash", "-n", str(INSTALL)], check=True, timeout=30)
    assert os.access(INSTALL, os.X_OK)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_install_sh_is_shellcheck_clean() -> None:
    result = subprocess.run(
        ["shellcheck", str(INSTALL)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout


def test_dry_run_plans_every_step_and_changes_nothing(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    result = run_install(
        "--dry-run", "--prefix", str(prefix), "--extras", "onnx", "--python", sys.executable
    )
    assert result.returncode == 0, result.stderr
    assert not prefix.exists()
    plan = planned(result.stdout)
    venv = prefix / "opt/edge-agent"
    assert [sys.executable, "-m", "venv", str(venv)] in plan
    pip = [c for c in plan if c[:3] == [f"{venv}/bin/python", "-m", "pip"]]
    assert pip[-1][-1] == f"{ROOT}[onnx]"
    installed = {c[-1]: c for c in plan if c[0] == "install"}
    for src, dst, mode in (
        ("edge-agent.service", "etc/systemd/system/edge-agent.service", "0644"),
        ("edge-agent.tmpfiles", "etc/tmpfiles.d/edge-agent.conf", "0644"),
        ("edge-agent.sysusers", "etc/sysusers.d/edge-agent.conf", "0644"),
        ("edge-agent-renew.service", "etc/systemd/system/edge-agent-renew.service", "0644"),
        ("edge-agent-renew.timer", "etc/systemd/system/edge-agent-renew.timer", "0644"),
        ("agent.example.toml", "etc/edge-agent/agent.toml", "0640"),
    ):
        command = installed[str(prefix / dst)]
        assert command[-2] == str(SYSTEMD / src) and command[command.index("-m") + 1] == mode
    if shutil.which("systemd-sysusers"):
        assert ["systemd-sysusers", "--root", str(prefix), str(prefix / SYSUSERS_REL)] in plan
    if shutil.which("systemd-tmpfiles"):
        tmpfiles = ["systemd-tmpfiles", "--root", str(prefix), "--create"]
        assert [*tmpfiles, str(prefix / TMPFILES_REL)] in plan
    assert not any(c[0] == "systemctl" for c in plan)  # never under a prefix
    assert "Next steps" in result.stdout
    assert "systemctl enable --now edge-agent-renew.timer" in result.stdout


def test_dry_run_keeps_an_existing_config(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    config = prefix / "etc/edge-agent/agent.toml"
    config.parent.mkdir(parents=True)
    config.write_text("# mine\n")
    result = run_install("--dry-run", "--files-only", "--prefix", str(prefix))
    assert result.returncode == 0, result.stderr
    assert f"keeping existing config: {config}" in result.stdout
    assert not any(c[-1] == str(config) for c in planned(result.stdout))
    assert config.read_text() == "# mine\n"


def test_dry_run_with_a_wheel_and_no_extras(tmp_path: Path) -> None:
    wheel = tmp_path / "edge_agent-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    result = run_install(
        "--dry-run",
        "--prefix",
        str(tmp_path / "root"),
        "--extras",
        "",
        "--python",
        sys.executable,
        str(wheel),
    )
    assert result.returncode == 0, result.stderr
    pip = [c for c in planned(result.stdout) if "pip" in c and "install" in c]
    assert pip[-1][-1] == str(wheel)


def test_files_only_install_is_idempotent(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    first = run_install("--files-only", "--prefix", str(prefix))
    assert first.returncode == 0, first.stdout + first.stderr
    unit = prefix / "etc/systemd/system/edge-agent.service"
    assert unit.read_text() == UNIT.read_text()
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    config = prefix / "etc/edge-agent/agent.toml"
    assert config.read_text() == (SYSTEMD / "agent.example.toml").read_text()
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    assert (prefix / "opt/edge-agent/share/doc/edge-agent/systemd.md").is_file()
    docs = prefix / "opt/edge-agent/share/doc/edge-agent"
    assert (docs / "provisioning.md").read_text() == (ROOT / "docs/provisioning.md").read_text()
    timer = prefix / "etc/systemd/system/edge-agent-renew.timer"
    assert timer.read_text() == (SYSTEMD / "edge-agent-renew.timer").read_text()
    if os.geteuid() == 0 and shutil.which("systemd-tmpfiles"):
        assert stat.S_IMODE((prefix / "var/lib/edge-agent").stat().st_mode) == 0o750
    config.write_text("# edited\n")
    second = run_install("--files-only", "--prefix", str(prefix))
    assert second.returncode == 0, second.stdout + second.stderr
    assert not any(c[0] == "install" for c in planned(second.stdout))
    # the unit, tmpfiles, sysusers, the two docs, the renewal service and timer
    assert second.stdout.count("unchanged: ") == 7
    assert config.read_text() == "# edited\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--extras", "onnx;reboot"], "--extras"),
        (["--prefix", "relative/dir"], "absolute"),
        (["--frobnicate"], "unknown option"),
        (["/nonexistent/edge-agent"], "SOURCE must be"),
        (["--extras"], "needs a value"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_install("--dry-run", "--prefix", str(tmp_path), *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_installing_into_the_real_root_needs_root() -> None:
    if os.geteuid() != 0:
        result = run_install("--files-only")
    elif shutil.which("setpriv"):
        result = run_install("--files-only", user="65534")  # nobody
    else:
        pytest.skip("running as root without setpriv to drop privileges")
    assert result.returncode == 2
    assert "needs root" in result.stderr

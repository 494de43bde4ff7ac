"""System figures from fake /proc and /sys trees, and sd_notify over a real unix socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from agent.sdnotify import Notifier
from agent.telemetry import SystemProbe, system_report


def fake_tree(root: Path, cpu_line: str) -> SystemProbe:
    proc, sys_ = root / "proc", root / "sys"
    (proc / "self").mkdir(parents=True)
    (proc / "stat").write_text(cpu_line + "\ncpu0 1 2 3 4\n")
    (proc / "meminfo").write_text(
        "MemTotal:  8048576 kB\nMemFree: 100 kB\nMemAvailable: 4024288 kB\n"
    )
    (proc / "self" / "status").write_text("Name:\tpython\nVmRSS:\t  204800 kB\n")
    (proc / "loadavg").write_text("0.50 0.40 0.30 1/200 1234\n")
    for i, (kind, milli) in enumerate(
        [("CPU-therm", "48500"), ("GPU-therm", "51000"), ("CPU-therm", "47000"), ("broken", "n/a")]
    ):
        zone = sys_ / "class" / "thermal" / f"thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        (zone / "temp").write_text(milli + "\n")
    return SystemProbe(proc=proc, sys=sys_)


def test_figures_from_a_jetson_like_tree(tmp_path: Path) -> None:
    probe = fake_tree(tmp_path, "cpu  100 0 100 800 0 0 0 0 0 0")
    assert probe.cpu_percent() is None  # needs two readings
    (probe.proc / "stat").write_text("cpu  200 0 200 900 0 0 0 0 0 0\n")
    assert probe.cpu_percent() == pytest.approx(66.7)
    assert probe.memory() == {"total_mb": 7859, "available_mb": 3929}
    assert probe.rss_mb() == 200.0
    assert probe.temperatures() == {
        "CPU-therm": 48.5,
        "GPU-therm": 51.0,
        "CPU-therm-thermal_zone2": 47.0,
    }
    report = system_report(probe, tmp_path)
    assert report["temperature_max_c"] == 51.0
    assert report["disk_free_mb"] > 0
    assert report["load"] == [0.5, 0.4, 0.3]


def test_missing_trees_give_empty_figures(tmp_path: Path) -> None:
    probe = SystemProbe(proc=tmp_path / "none", sys=tmp_path / "none")
    assert probe.cpu_percent() is None and probe.temperatures() == {}
    assert probe.memory() == {"total_mb": 0, "available_mb": 0}
    assert system_report(probe, tmp_path / "gone")["disk_free_mb"] is None


def test_real_machine_probe_reads_something() -> None:
    probe = SystemProbe()
    assert probe.memory()["total_mb"] > 0
    assert (probe.rss_mb() or 0) > 0


def test_sd_notify_over_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.settimeout(2)
    try:
        env = {
            "NOTIFY_SOCKET": str(path),
            "WATCHDOG_USEC": "20000000",
            "WATCHDOG_PID": str(os.getpid()),
        }
        notifier = Notifier(env)
        assert notifier.enabled and notifier.watchdog_interval_s == 10.0
        assert notifier.ready("2 pipelines")
        assert server.recv(256) == b"READY=1\nSTATUS=2 pipelines"
        notifier.watchdog()
        assert server.recv(256) == b"WATCHDOG=1"
        notifier.stopping()
        assert server.recv(256) == b"STOPPING=1"
        notifier.close()
    finally:
        server.close()


def test_sd_notify_is_off_outside_systemd() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and not notifier.ready() and notifier.watchdog_interval_s is None
    other = Notifier(
        {"NOTIFY_SOCKET": "/nonexistent/sock", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}
    )
    assert other.watchdog_interval_s is None  # the watchdog is meant for another process
    assert other.send("READY=1") is False
    other.close()

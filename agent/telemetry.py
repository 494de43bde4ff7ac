"""Device health for telemetry: CPU, memory, RSS, temperatures, disk, read from /proc and
/sys (roots configurable, so tests and `doctor` can read fake trees).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


@dataclass
class SystemProbe:
    """Reads the machine's figures; CPU use is measured between two calls."""

    proc: Path = Path("/proc")
    sys: Path = Path("/sys")
    _last_cpu: tuple[int, int] | None = field(default=None, repr=False)

    def cpu_percent(self) -> float | None:
        """Busy share of all CPUs since the previous call (None on the first call)."""
        text = _read(self.proc / "stat")
        if not text or not text.startswith("cpu "):
            return None
        values = [int(v) for v in text.splitlines()[0].split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        total = sum(values[:8])
        previous, self._last_cpu = self._last_cpu, (idle, total)
        if previous is None or total == previous[1]:
            return None
        busy = 1.0 - (idle - previous[0]) / (total - previous[1])
        return round(100.0 * max(0.0, min(1.0, busy)), 1)

    def memory(self) -> dict[str, int]:
        """MemTotal and MemAvailable in MiB."""
        out: dict[str, int] = {}
        for line in (_read(self.proc / "meminfo") or "").splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable") and rest.split():
                out[key] = int(rest.split()[0]) // 1024
        return {"total_mb": out.get("MemTotal", 0), "available_mb": out.get("MemAvailable", 0)}

    def rss_mb(self, pid: int | str = "self") -> float | None:
        for line in (_read(self.proc / str(pid) / "status") or "").splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
        return None

    def temperatures(self) -> dict[str, float]:
        """Thermal zones in degrees C, keyed by their type (cpu-thermal, GPU-therm, ...)."""
        zones: dict[str, float] = {}
        base = self.sys / "class" / "thermal"
        if not base.is_dir():
            return zones
        for zone in sorted(base.glob("thermal_zone*")):
            raw = _read(zone / "temp")
            if raw is None or not raw.strip().lstrip("-").isdigit():
                continue
            name = (_read(zone / "type") or zone.name).strip() or zone.name
            if name in zones:
                name = f"{name}-{zone.name}"
            zones[name] = round(int(raw.strip()) / 1000.0, 1)
        return zones

    def load(self) -> list[float]:
        text = _read(self.proc / "loadavg")
        return [float(v) for v in text.split()[:3]] if text else []


def disk_free_mb(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free // (1 << 20)
    except OSError:
        return None


def system_report(probe: SystemProbe, state_dir: Path) -> dict[str, Any]:
    temps = probe.temperatures()
    return {
        "cpu_percent": probe.cpu_percent(),
        "load": probe.load(),
        "memory": probe.memory(),
        "rss_mb": probe.rss_mb(),
        "temperature_c": temps,
        "temperature_max_c": max(temps.values()) if temps else None,
        "disk_free_mb": disk_free_mb(state_dir),
        "pid": os.getpid(),
        "ts": round(time.time(), 3),
    }

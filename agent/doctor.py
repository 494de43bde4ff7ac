"""`edge-agent doctor`: what this device offers the agent and what stands in its way
(platform, accelerators, runtimes, cameras, serial ports, broker, clock), as a table or JSON.

JSON: {"platform": {...}, "runtimes": [...], "checks": [{section, name, status, detail,
data}], "summary": {"ok": n, "warn": n, "fail": n, "absent": n}}. Exit status 1 when a
check failed, else 0.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from agent.doctor_broker import broker_checks, clock_check
from agent.doctor_checks import Check, Host, Status, board_info, host_checks
from runtimes.hardware import as_dict, runtime_reports

SECTIONS = ("platform", "accelerators", "runtimes", "devices", "broker", "clock")


def runtime_checks(reports: list[dict[str, Any]]) -> list[Check]:
    checks = []
    for rt in reports:
        if rt["error"]:
            checks.append(Check("runtimes", rt["name"], Status.ABSENT, rt["error"]))
            continue
        detail = f"{rt['package']} {rt['version']}"  # providers, delegates: in data
        checks.append(Check("runtimes", rt["name"], Status.OK, detail, rt["detail"]))
    return checks


def collect(
    *,
    root: Path = Path("/"),
    config: Path | None = None,
    timeout: float = 2.0,
    now: datetime | None = None,
    runtimes: bool = True,
) -> dict[str, Any]:
    """Run every check; `root` is where /proc, /sys, /dev and /etc are read from."""
    host = Host(root)
    reports = as_dict(runtime_reports()) if runtimes else []
    checks = host_checks(host) + runtime_checks(reports)
    certs: list = []
    if config is not None:
        found, certs = broker_checks(config, timeout=timeout, now=now)
        checks += found
    checks.append(clock_check(host, certs, now))
    checks.sort(key=lambda c: SECTIONS.index(c.section))
    summary = {s.value: sum(c.status is s for c in checks) for s in Status}
    return {
        "platform": board_info(host),
        "runtimes": reports,
        "checks": [c.as_dict() for c in checks],
        "summary": summary,
    }


def render(report: dict[str, Any]) -> str:
    """The table: one line per check, runtimes with their providers and delegates."""
    lines: list[str] = []
    section = None
    for check in report["checks"]:
        if check["section"] != section:
            section = check["section"]
            lines.append(section)
        lines.append(f"  {check['name']:<18} {check['status'].upper():<6} {check['detail']}")
        if section == "runtimes":
            info = check["data"]
            if "providers" in info:
                lines.append(f"  {'':<18} {'':<6} providers: {', '.join(info['providers'])}")
            if "delegates" in info:
                found = [k for k, v in info["delegates"].items() if v]
                missing = [k for k, v in info["delegates"].items() if not v]
                lines.append(
                    f"  {'':<18} {'':<6} delegates: xnnpack"
                    + (", " + ", ".join(found) if found else "")
                    + (f" (not found: {', '.join(missing)})" if missing else "")
                )
    summary = report["summary"]
    lines.append(", ".join(f"{summary[s.value]} {s.value}" for s in Status))
    return "\n".join(lines)


def run_doctor(
    as_json: bool,
    out: IO[str],
    *,
    config: Path | None = None,
    root: Path = Path("/"),
    timeout: float = 2.0,
) -> int:
    report = collect(root=root, config=config, timeout=timeout)
    out.write((json.dumps(report, indent=2) if as_json else render(report)) + "\n")
    return 1 if report["summary"][Status.FAIL.value] else 0

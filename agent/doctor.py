"""`edge-agent doctor`: what this device has for the agent (runtimes, execution providers,
delegates, platform), as a table or JSON.
"""

from __future__ import annotations

import json
from typing import IO, Any

from runtimes.hardware import as_dict, board, runtime_reports


def collect() -> dict[str, Any]:
    return {"platform": board(), "runtimes": as_dict(runtime_reports())}


def render(report: dict[str, Any]) -> str:
    lines = ["platform"]
    for key, value in report["platform"].items():
        lines.append(f"  {key:<10} {value}")
    lines.append("runtimes")
    for rt in report["runtimes"]:
        if rt["error"]:
            lines.append(f"  {rt['name']:<10} MISSING  {rt['error']}")
            continue
        lines.append(f"  {rt['name']:<10} ok       {rt['package']} {rt['version']}")
        detail = rt["detail"]
        if "providers" in detail:
            lines.append(f"  {'':<10} providers: {', '.join(detail['providers'])}")
        if "delegates" in detail:
            found = [k for k, v in detail["delegates"].items() if v]
            missing = [k for k, v in detail["delegates"].items() if not v]
            lines.append(
                f"  {'':<10} delegates: xnnpack"
                + (", " + ", ".join(found) if found else "")
                + (f" (not found: {', '.join(missing)})" if missing else "")
            )
    return "\n".join(lines)


def run_doctor(as_json: bool, out: IO[str]) -> int:
    report = collect()
    out.write((json.dumps(report, indent=2) if as_json else render(report)) + "\n")
    return 0

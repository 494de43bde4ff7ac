"""`edge-agent demo`, the README's first command, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EDGE_AGENT = Path(sys.executable).parent / "edge-agent"


def test_demo_runs_the_agent_against_its_own_broker() -> None:
    proc = subprocess.run(
        [str(EDGE_AGENT), "demo", "--seconds", "4", "--conf", "0.00001"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "status: online" in out and "status: offline" in out
    assert "reported: {'demo': 'yolox-nano@" in out
    assert "events/demo: frame" in out
    assert "agent exited with 0" in out

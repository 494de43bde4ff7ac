"""`edge-agent run` as the integration tests start it: a config on the test's broker with
fast reconnects, the demo-clip pipeline, and the subprocess cleaned up however the test ends."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from models.zoo import SAMPLES_DIR
from tests.mqtt_broker import Broker

EDGE_AGENT = Path(sys.executable).parent / "edge-agent"


def agent_toml(broker: Broker, device: str, state: Path, body: str) -> str:
    """[device], [mqtt] (reconnects within a second) and [telemetry] every second, then
    `body` (pipelines, extensions)."""
    return f"""
[device]
id = "{device}"
state_dir = "{state}"

[mqtt]
host = "{broker.host}"
port = {broker.port}
reconnect_min_s = 0.2
reconnect_max_s = 1.0

[telemetry]
interval_s = 1.0
{body}"""


def demo_pipeline(model: str, extra: str = "") -> str:
    """The [[pipelines]] section "door" on the bundled demo clip with `model`."""
    return f"""
[[pipelines]]
name = "door"
source = "{SAMPLES_DIR / "demo.mp4"}"
model = "{model}"
{extra}"""


@contextlib.contextmanager
def agent_process(config: Path, graceful: bool = False) -> Iterator[subprocess.Popen[str]]:
    """`edge-agent run --config CONFIG`, stdout and stderr together in `proc.stdout`. On
    exit it is killed, or with `graceful` sent SIGTERM first (killed after 15 s)."""
    proc = subprocess.Popen(
        [str(EDGE_AGENT), "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            if graceful:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
            else:
                proc.kill()
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()

"""The [serial] extension in a running agent (`edge-agent run` as a subprocess, a real
mosquitto, the bundled clip and model): detection events go out through a real pty pair
with ACKs, and the GPS fix read from another pty rides along on events and telemetry."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.serial_lines import with_checksum
from tests.agent_proc import agent_process, demo_pipeline
from tests.agent_proc import agent_toml as proc_toml
from tests.mqtt_broker import Broker, Observer, Received
from tests.test_serial_io import Pty

DEVICE = "cam-serial"
GGA = with_checksum("GPGGA,123519.00,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,")
LAT, LON = 48 + 7.038 / 60, 11 + 31.0 / 60


def agent_toml(broker: Broker, state: Path, sink: str, gps: str) -> str:
    pipeline = demo_pipeline(
        "yolox-nano-tflite-int8", 'conf = 0.00001\nevent_mode = "rate"\nrate_s = 0.3\n'
    )
    return (
        proc_toml(broker, DEVICE, state, pipeline)
        + f"""
[serial]
max_age_s = 5.0

[serial.sink]
port = "{sink}"
ack = true
ack_timeout_s = 1.0
max_rate_hz = 20.0

[[serial.sources]]
name = "gps"
port = "{gps}"
kinds = ["nmea"]
"""
    )


class GpsFeeder:
    """Writes a GGA sentence to the GPS pty every 0.2 s from its own thread."""

    def __init__(self, pty: Pty) -> None:
        self.pty = pty
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            # nobody has the slave open yet: the line is lost, as on a real UART
            with contextlib.suppress(OSError):
                self.pty.write(f"{GGA}\r\n".encode())

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)


@pytest.fixture
def agent_with_serial(
    broker: Broker, tmp_path: Path, observers: Callable[..., Observer]
) -> Iterator[tuple[subprocess.Popen[str], Observer, Pty]]:
    sink, gps = Pty(), Pty()
    feeder = GpsFeeder(gps)
    config = tmp_path / "agent.toml"
    config.write_text(agent_toml(broker, tmp_path / "state", sink.name, gps.name))
    watcher = observers(broker, [f"edge/{DEVICE}/events/#", f"edge/{DEVICE}/telemetry"])
    try:
        with agent_process(config, graceful=True) as proc:
            yield proc, watcher, sink
    finally:
        feeder.close()
        sink.close()
        gps.close()


def sink_events(sink: Pty, count: int, timeout: float = 30.0) -> list[dict]:
    """Play the device: read JSON lines, ACK each by its link_seq, until `count` with gps."""
    got: list[dict] = []
    buf = b""
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"sink got {got}; pending {buf!r}"
        buf += sink.read(0.1)
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            event = json.loads(line)
            sink.write(f"ACK {event['link_seq']}\n".encode())
            if "gps" in event:
                got.append(event)
    return got


def test_events_go_to_the_serial_sink_with_the_gps_fix(
    agent_with_serial: tuple[subprocess.Popen[str], Observer, Pty],
) -> None:
    proc, watcher, sink = agent_with_serial
    events = sink_events(sink, 3)
    for event in events:
        assert event["pipeline"] == "door" and "detections" in event
        assert event["gps"]["lat"] == pytest.approx(LAT) and event["gps"]["lon"] == pytest.approx(
            LON
        )
        assert event["gps"]["fix_quality"] == 1 and 0 <= event["gps"]["age_s"] < 5
        assert "snapshot_jpeg_b64" not in event

    # the same events on MQTT carry the fix too
    msg = watcher.next(lambda m: m.topic.endswith("/events/door") and b'"gps"' in m.payload, 20)
    body = msg.json()
    assert body["gps"]["lat"] == pytest.approx(LAT)

    # telemetry: sink counters (acked: the test's ACKs were matched) and the latest fix
    def acked(m: Received) -> bool:
        if not m.topic.endswith("/telemetry"):
            return False
        serial = m.json().get("serial") or {}
        return bool((serial.get("sink") or {}).get("acked"))

    tele = json.loads(watcher.next(acked, 20).payload)["serial"]
    assert tele["sink"]["state"] == "open" and tele["sink"].get("failed", 0) == 0
    assert tele["sources"]["gps"]["gps"] >= 1
    assert tele["latest"]["gps"]["lat"] == pytest.approx(LAT)
    assert proc.poll() is None, "the agent stopped"

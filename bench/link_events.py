"""Benchmark: events per second through the agent's outbox and MQTT link to a local
mosquitto, against a raw paho client publishing the same messages (QoS 1) to the same
broker in the same run; then RSS and CPU of a running `edge-agent run` on the demo clip.

    .venv/bin/python bench/link_events.py [--events 5000] [--payload 300] [--agent-seconds 20]

Each message is counted when a separate subscriber receives it, so the figure is end to
end: outbox write (SQLite, WAL, one row per event), sender thread, PUBACK, row removal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.mqtt_link import LinkState, MqttLink
from agent.outbox import Outbox
from models.zoo import SAMPLES_DIR
from tests.mqtt_broker import Broker, mqtt_config


class Counter:
    """A subscriber that counts messages on one topic filter until it has `want`."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.count = 0
        self.want = 0
        self.done = threading.Event()
        self._ready = threading.Event()
        self._client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self._client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self._client.on_subscribe = lambda *_: self._ready.set()
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        if not self._ready.wait(5):
            raise RuntimeError("counter could not subscribe")

    def _on_message(self, *_: object) -> None:
        self.count += 1
        if self.count >= self.want:
            self.done.set()

    def expect(self, n: int) -> None:
        self.count, self.want = 0, n
        self.done.clear()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def raw_paho(broker: Broker, counter: Counter, n: int, payload: bytes) -> float:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.max_inflight_messages_set(64)
    client.connect(broker.host, broker.port)
    client.loop_start()
    counter.expect(n)
    t0 = time.perf_counter()
    for i in range(n):
        client.publish(f"edge/raw/events/cam-{i % 2}", payload, qos=1)
    if not counter.done.wait(120):
        raise RuntimeError(f"raw: only {counter.count}/{n} arrived")
    elapsed = time.perf_counter() - t0
    client.disconnect()
    client.loop_stop()
    return elapsed


def through_link(work: Path, broker: Broker, counter: Counter, n: int, payload: bytes) -> float:
    outbox = Outbox(work / f"outbox-{time.monotonic_ns()}.db")
    link = MqttLink("bench", mqtt_config(broker), outbox)
    link.start()
    if not link.wait_for(LinkState.CONNECTED, timeout=10):
        raise RuntimeError("the link did not connect")
    counter.expect(n)
    t0 = time.perf_counter()
    for i in range(n):
        link.publish(f"edge/bench/events/cam-{i % 2}", payload, qos=1)
    if not counter.done.wait(120):
        raise RuntimeError(f"link: only {counter.count}/{n} arrived")
    elapsed = time.perf_counter() - t0
    link.stop(5)
    outbox.close()
    return elapsed


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def agent_footprint(work: Path, broker: Broker, seconds: float, pipelines: bool) -> dict:
    """RSS and CPU share of `edge-agent run` after a 5 s settle, over `seconds`."""
    state = work / f"state-{int(pipelines)}"
    pipe = (
        f'[[pipelines]]\nname = "door"\nsource = "{SAMPLES_DIR / "demo.mp4"}"\n'
        'model = "yolox-nano-tflite-int8"\n'
        if pipelines
        else ""
    )
    config = work / f"agent-{int(pipelines)}.toml"
    config.write_text(
        f'[device]\nid = "bench-agent"\nstate_dir = "{state}"\n\n'
        f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n\n{pipe}'
    )
    exe = Path(sys.executable).parent / "edge-agent"
    proc = subprocess.Popen(
        [str(exe), "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(5)
        if proc.poll() is not None:
            raise RuntimeError(f"edge-agent run exited with {proc.returncode}")
        c0, t0 = _proc_cpu_s(proc.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = _proc_cpu_s(proc.pid), time.monotonic()
        return {"rss_mb": _proc_rss_mb(proc.pid), "cpu_pct": 100 * (c1 - c0) / (t1 - t0)}
    finally:
        proc.terminate()
        proc.wait(15)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--payload", type=int, default=300, help="bytes per event")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; best counts")
    parser.add_argument("--agent-seconds", type=float, default=20.0)
    args = parser.parse_args()
    event = {"pipeline": "cam", "seq": 0, "detections": [{"class": "circle", "score": 0.9}]}
    payload = json.dumps(event).encode().ljust(args.payload, b" ")
    with tempfile.TemporaryDirectory(prefix="link-bench-") as tmp:
        work = Path(tmp)
        broker = Broker(work / "broker")
        broker.start()
        counter = Counter(broker, "edge/+/events/#")
        try:
            raw_s, link_s = [], []
            for r in range(args.rounds):
                raw_s.append(raw_paho(broker, counter, args.events, payload))
                link_s.append(through_link(work, broker, counter, args.events, payload))
                print(
                    f"round {r + 1}: raw {args.events / raw_s[-1]:.0f}/s, "
                    f"link {args.events / link_s[-1]:.0f}/s",
                    file=sys.stderr,
                )
            raw_rate, link_rate = args.events / min(raw_s), args.events / min(link_s)
            print(f"{args.events} events of {args.payload} B, QoS 1, best of {args.rounds}")
            print(f"raw paho:           {raw_rate:8.0f} events/s")
            print(
                f"outbox + MqttLink:  {link_rate:8.0f} events/s  ratio {link_rate / raw_rate:.2f}"
            )
            for pipelines in (False, True):
                fp = agent_footprint(work, broker, args.agent_seconds, pipelines)
                what = "demo clip pipeline (15 fps)" if pipelines else "no pipeline (idle)"
                print(
                    f"edge-agent run, {what}: RSS {fp['rss_mb']:.0f} MB, "
                    f"CPU {fp['cpu_pct']:.1f}% of one core"
                )
        finally:
            counter.close()
            broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

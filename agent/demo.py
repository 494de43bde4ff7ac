"""`edge-agent demo`: the agent on the bundled model and clip, talking to a mosquitto it
starts on a free loopback port, with what the fleet would see printed as it arrives.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from models.zoo import SAMPLES_DIR
from runtimes.errors import EdgeAgentError

DEVICE = "demo-cam"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and Path(candidate).exists():
            return candidate
    raise EdgeAgentError("mosquitto is not installed: apt-get install mosquitto")


def summary(topic: str, payload: bytes) -> str:
    kind = topic.split("/", 2)[2]
    try:
        body: Any = json.loads(payload)
    except ValueError:
        return f"{kind}: {payload[:80]!r}"
    if kind.startswith("events/"):
        dets = body.get("detections", [])
        found = ", ".join(f"{d['class']} {d['score']:.2f}" for d in dets[:5])
        more = f" (+{len(dets) - 5} more)" if len(dets) > 5 else ""
        return f"{kind}: frame {body.get('frame')}: {found or 'nothing'}{more}"
    if kind == "telemetry":
        pipes = body.get("pipelines", {})
        parts = [
            f"{n}: {p['fps']:.1f} fps, infer p50 {p['latency']['infer']['p50_ms']:.1f} ms"
            for n, p in pipes.items()
        ]
        return f"telemetry: {'; '.join(parts)}, outbox {body['outbox'].get('messages')}"
    if kind == "status":
        return f"status: {body.get('status')}"
    if kind == "reported":
        models = {n: p["model"] for n, p in body.get("pipelines", {}).items()}
        return f"reported: {models}"
    return f"{kind}: {json.dumps(body)[:100]}"


def run_demo(model: str, seconds: float, conf: float, out: IO[str] = sys.stdout) -> int:
    work = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    port = free_port()
    (work / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
    )
    config = work / "agent.toml"
    config.write_text(
        f'[device]\nid = "{DEVICE}"\nstate_dir = "{work / "state"}"\n\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\n\n[telemetry]\ninterval_s = 5.0\n\n'
        f'[[pipelines]]\nname = "demo"\nsource = "{SAMPLES_DIR / "demo.mp4"}"\n'
        f'model = "{model}"\nconf = {conf}\nevent_mode = "rate"\nrate_s = 1.0\n'
    )
    broker = subprocess.Popen(
        [find_mosquitto(), "-c", str(work / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    agent: subprocess.Popen[bytes] | None = None
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    try:
        for _ in range(50):
            try:
                client.connect("127.0.0.1", port)
                break
            except OSError:
                time.sleep(0.1)

        def on_message(_c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
            line = summary(message.topic, bytes(message.payload))
            out.write(f"{time.strftime('%H:%M:%S')} {line}\n")
            out.flush()

        client.on_message = on_message
        client.subscribe(f"edge/{DEVICE}/#", qos=1)
        client.loop_start()
        out.write(f"broker on 127.0.0.1:{port}; agent config {config}; {seconds:.0f} s\n")
        agent = subprocess.Popen(
            [str(Path(sys.executable).parent / "edge-agent"), "run", "--config", str(config)]
        )
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and agent.poll() is None:
            time.sleep(0.2)
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
        code = agent.wait(30)
        time.sleep(0.5)  # let the offline status arrive
        out.write(f"agent exited with {code}\n")
        return code
    finally:
        client.loop_stop()
        client.disconnect()
        if agent is not None and agent.poll() is None:
            agent.kill()
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(work, ignore_errors=True)

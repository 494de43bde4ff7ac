"""`edge-agent run` end to end, as systemd runs it: a subprocess on the bundled demo clip and
model, a real mosquitto, commands with MQTT 5 request/response, telemetry, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.agent_proc import EDGE_AGENT, agent_process, demo_pipeline
from tests.agent_proc import agent_toml as proc_toml
from tests.mqtt_broker import Broker, Observer

DEVICE = "cam-e2e"


def agent_toml(broker: Broker, state: Path, conf: float = 0.00001) -> str:
    pipeline = demo_pipeline(
        "yolox-nano-tflite-int8", f'conf = {conf}\nevent_mode = "rate"\nrate_s = 0.3\n'
    )
    return proc_toml(broker, DEVICE, state, pipeline)


@pytest.fixture
def running(
    broker: Broker, tmp_path: Path, observers: Callable[..., Observer]
) -> Iterator[tuple[subprocess.Popen[str], Observer, Path]]:
    config = tmp_path / "agent.toml"
    config.write_text(agent_toml(broker, tmp_path / "state"))
    watcher = observers(broker, [f"edge/{DEVICE}/#"])
    with agent_process(config) as proc:
        yield proc, watcher, config


def command(
    watcher: Observer, name: str, payload: bytes | str, corr: bytes, timeout: float = 15
) -> dict:
    reply_topic = f"edge/{DEVICE}/reply/test-{corr.decode()}"
    watcher.publish(
        f"edge/{DEVICE}/cmd/{name}", payload, response_topic=reply_topic, correlation_data=corr
    )
    msg = watcher.next(lambda m: m.topic == reply_topic, timeout)
    assert msg.correlation_data == corr
    return msg.json()


def test_agent_runs_reports_and_answers_commands(running, broker: Broker) -> None:
    proc, watcher, config = running
    status = watcher.next(lambda m: m.topic.endswith("/status") and b"online" in m.payload, 60)
    assert status.json()["version"]
    reported = watcher.next(lambda m: m.topic.endswith("/reported"), 30).json()
    assert reported["pipelines"]["door"]["model"].startswith("yolox-nano@")
    assert "ping" in reported["capabilities"]["commands"]
    event = watcher.next(lambda m: m.topic == f"edge/{DEVICE}/events/door", 30).json()
    assert event["detections"] and event["model"].startswith("yolox-nano@")
    assert "seq" in watcher.seen[-1].user_properties
    telemetry = watcher.next(
        lambda m: m.topic.endswith("/telemetry") and m.json()["pipelines"]["door"]["frames"] > 0,
        30,
    ).json()
    door = telemetry["pipelines"]["door"]
    assert door["fps"] > 0 and door["latency"]["infer"]["p50_ms"] > 0
    assert telemetry["link"]["state"] == "connected"
    assert telemetry["system"]["rss_mb"] > 0

    assert command(watcher, "ping", '{"echo": 7}', b"c1")["result"] == {"pong": True, "echo": 7}
    unknown = command(watcher, "self_destruct", "{}", b"c2")
    assert unknown["ok"] is False and unknown["error"]["code"] == "unknown_command"
    garbage = command(watcher, "ping", b"\xff{not json", b"c3")
    assert garbage["ok"] is False and garbage["error"]["code"] == "bad_json"
    not_object = command(watcher, "ping", "[1, 2]", b"c4")
    assert not_object["error"]["code"] == "bad_args"
    snap = command(watcher, "snapshot", '{"pipeline": "door"}', b"c5")
    assert snap["ok"] and snap["result"]["jpeg_b64"] and snap["result"]["width"] == 640
    bad_snap = command(watcher, "snapshot", '{"pipeline": "nope"}', b"c6")
    assert bad_snap["error"]["code"] == "bad_args"

    # A live change: the threshold applies without a restart and the file is rewritten.
    new_text = config.read_text().replace("conf = 1e-05", "conf = 0.5")
    changed = command(watcher, "set_config", json.dumps({"toml": new_text}), b"c7")
    assert changed["ok"], changed
    assert changed["result"]["applied"] == ["pipelines.door"]
    assert changed["result"]["restart_required"] == []
    assert "conf = 0.5" in config.read_text()
    broken = command(watcher, "set_config", json.dumps({"toml": "[device]\nid = 3\n"}), b"c8")
    assert broken["error"]["code"] == "invalid_config"
    assert "<new config>:2: device.id" in broken["error"]["message"]
    assert "conf = 0.5" in config.read_text()  # a bad config never replaces the good one
    st = command(watcher, "status", "{}", b"c9")
    assert st["result"]["reported"]["config_revision"] == 1
    assert proc.poll() is None  # nothing above hurt the agent

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    offline = watcher.next(lambda m: m.topic.endswith("/status") and b"offline" in m.payload, 10)
    assert offline.json()["status"] == "offline"


def test_agent_survives_the_broker_going_away(running, broker: Broker) -> None:
    proc, watcher, _ = running
    watcher.next(lambda m: m.topic == f"edge/{DEVICE}/events/door", 60)
    broker.stop()
    time.sleep(2)  # events keep queueing in the outbox meanwhile
    assert proc.poll() is None
    broker.start()
    # The observer reconnects by itself; the agent delivers what it queued and goes on.
    watcher.next(lambda m: m.topic.endswith("/status") and b"online" in m.payload, 30)
    seqs = []
    for _ in range(3):
        msg = watcher.next(lambda m: m.topic == f"edge/{DEVICE}/events/door", 30)
        seqs.append(int(msg.user_properties["seq"]))
    assert seqs == sorted(seqs)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_restart_command_exits_for_systemd_to_restart(running) -> None:
    proc, watcher, _ = running
    watcher.next(lambda m: m.topic.endswith("/status") and b"online" in m.payload, 60)
    reply = command(watcher, "restart", "{}", b"r1")
    assert reply["result"] == {"restarting": True}
    assert proc.wait(30) == 75


def test_bad_config_fails_at_start_with_the_line(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[device]\nid = "x"\n\n[mqtt]\nhost = "h"\nportt = 1\n')
    proc = subprocess.run(
        [str(EDGE_AGENT), "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 78
    assert f"{config}:6" in proc.stderr and "portt" in proc.stderr

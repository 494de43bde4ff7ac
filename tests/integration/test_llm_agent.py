"""`llm.generate` through the real agent and a real mosquitto: tokens stream back on the
MQTT5 response topic as numbered chunks, then a final message with usage; cancel; bad
requests get error replies; the detection pipeline keeps running meanwhile."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.agent_proc import EDGE_AGENT, agent_process, demo_pipeline
from tests.agent_proc import agent_toml as proc_toml
from tests.mqtt_broker import Broker, Observer, Received

DEVICE = "llm-e2e"


def agent_toml(broker: Broker, state: Path) -> str:
    pipeline = demo_pipeline("yolox-nano-onnx-int8", 'event_mode = "rate"\nrate_s = 0.5\n')
    return (
        proc_toml(broker, DEVICE, state, pipeline)
        + """
[llm]
model = "tiny-llama-onnx-int8"
max_batch = 4
cache_mb = 4.0
max_tokens_limit = 200
"""
    )


@pytest.fixture
def agent(
    broker: Broker, tmp_path: Path, observers: Callable[..., Observer]
) -> Iterator[tuple[subprocess.Popen[str], Observer]]:
    config = tmp_path / "agent.toml"
    config.write_text(agent_toml(broker, tmp_path / "state"))
    watcher = observers(broker, [f"edge/{DEVICE}/#"])
    with agent_process(config) as proc:
        watcher.next(lambda m: m.topic.endswith("/status") and b"online" in m.payload, 60)
        yield proc, watcher


def send(watcher: Observer, name: str, payload: str | bytes, corr: str) -> str:
    topic = f"edge/{DEVICE}/reply/test-{corr}"
    watcher.publish(
        f"edge/{DEVICE}/cmd/{name}", payload, response_topic=topic, correlation_data=corr.encode()
    )
    return topic


def stream(watcher: Observer, topic: str, timeout: float = 30) -> list[dict]:
    """Every message on `topic` up to and including the one with done (or an error)."""
    got: list[dict] = []
    while True:
        msg: Received = watcher.next(lambda m: m.topic == topic and m not in seen, timeout)
        seen.append(msg)
        body = msg.json()
        got.append(body)
        if body.get("done") or body["ok"] is False or "result" in body:
            return got


seen: list[Received] = []


def test_llm_generate_streams_tokens_with_usage(agent) -> None:
    proc, watcher = agent
    topic = send(
        watcher,
        "llm.generate",
        json.dumps(
            {
                "prompt": "Return the number of",
                "max_tokens": 40,
                "ignore_eos": True,
            }
        ),
        "g1",
    )
    messages = stream(watcher, topic)
    assert all(m["command"] == "llm.generate" and m["id"] == b"g1".hex() for m in messages)
    assert [m["seq"] for m in messages] == list(range(len(messages)))
    final = messages[-1]
    assert final["ok"] and final["done"] and final["result"]["finish_reason"] == "length"
    assert len(messages) >= 2  # streamed before the end
    assert "".join(m["text"] for m in messages[:-1]) == final["result"]["text"]
    usage = final["result"]["usage"]
    assert usage["completion_tokens"] == 40 and usage["prompt_tokens"] == 5
    assert usage["ttft_s"] > 0 and usage["tokens_per_s"] > 0

    chat = stream(
        watcher,
        send(
            watcher,
            "llm.generate",
            json.dumps(
                {
                    "id": "chat-1",
                    "messages": [{"role": "user", "content": "What is the os module?"}],
                    "max_tokens": 20,
                }
            ),
            "g2",
        ),
    )
    assert chat[-1]["ok"] and chat[-1]["id"] == "chat-1"

    # malformed requests: each gets an error reply, none hurts the agent
    bad = {
        "b1": {"max_tokens": 5},
        "b2": {"prompt": "x", "messages": [{"role": "user", "content": "y"}]},
        "b3": {"prompt": "x", "max_tokens": 10_000},
        "b4": {"prompt": "x", "temperature": "hot"},
        "b5": {"prompt": "x", "colour": "red"},
        "b6": {"messages": [{"role": "user"}]},
        "b7": {"prompt": "x " * 400, "max_tokens": 200},
    }
    codes = {}
    for corr, args in bad.items():
        reply = stream(watcher, send(watcher, "llm.generate", json.dumps(args), corr))[-1]
        assert reply["ok"] is False
        codes[corr] = reply["error"]["code"]
    assert codes == {**{k: "bad_request" for k in bad}, "b7": "too_long"}
    junk = stream(watcher, send(watcher, "llm.generate", b"\xff{", "b8"))[-1]
    assert junk["error"]["code"] == "bad_json"
    missing = stream(watcher, send(watcher, "llm.cancel", '{"id": "nope"}', "b9"))[-1]
    assert missing["error"]["code"] == "not_found"

    # cancel a long one by its id
    long_topic = send(
        watcher,
        "llm.generate",
        json.dumps({"id": "long", "prompt": "The", "max_tokens": 200, "ignore_eos": True}),
        "g3",
    )
    watcher.next(lambda m: m.topic == long_topic, 30)
    send(watcher, "llm.cancel", '{"id": "long"}', "c1")
    final = [m for m in stream(watcher, long_topic) if m.get("done")][-1]
    assert final["result"]["finish_reason"] in ("cancelled", "length")

    telemetry = watcher.next(
        lambda m: (
            m.topic.endswith("/telemetry") and m.json().get("llm", {}).get("prefills", 0) >= 3
        ),
        30,
    ).json()
    assert telemetry["llm"]["kv_blocks_total"] > 0
    assert telemetry["pipelines"]["door"]["frames"] > 0
    reported = stream(watcher, send(watcher, "status", "{}", "s1"))[-1]["result"]["reported"]
    assert "llm.generate" in reported["capabilities"]["commands"]
    assert reported["llm"]["layout"] == "optimum"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_a_bad_llm_model_fails_at_start_as_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[device]\nid = "x"\nstate_dir = "{tmp_path}"\n\n[mqtt]\nhost = "127.0.0.1"\n'
        'port = 1\n\n[llm]\nmodel = "no-such-llm"\n'
    )
    proc = subprocess.run(
        [str(EDGE_AGENT), "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 78
    assert "llm.model" in proc.stderr and "tiny-llama-onnx-int8" in proc.stderr
    assert "tiny-llama-hf" not in proc.stderr

"""`diffusion.generate` through a running agent and a real mosquitto: progress, the image in
chunks with a sha256, a camera-conditioned request, detection fps during generation, and
error replies for malformed requests."""

from __future__ import annotations

import base64
import hashlib
import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from models.zoo import BUNDLED_DIR
from tests.agent_proc import agent_process, demo_pipeline
from tests.agent_proc import agent_toml as proc_toml
from tests.mqtt_broker import Broker, Observer

DEVICE = "diffuser-1"

PIPELINE = BUNDLED_DIR / "tiny-sd"


def agent_toml(broker: Broker, state: Path) -> str:
    pipeline = demo_pipeline("yolox-nano-onnx-fp32", 'runtime = { type = "onnx", threads = 1 }\n')
    return (
        proc_toml(broker, DEVICE, state, pipeline)
        + f"""
[diffusion]
model = "{PIPELINE}"
threads = 1
nice = 10
queue_depth = 1
max_steps = 30
max_size = 128
chunk_bytes = 2048
progress_every = 2
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
        yield proc, watcher


def ask(watcher: Observer, args: dict[str, Any] | bytes, corr: bytes) -> str:
    topic = f"edge/{DEVICE}/reply/t-{corr.decode()}"
    payload = args if isinstance(args, bytes) else json.dumps(args)
    watcher.publish(
        f"edge/{DEVICE}/cmd/diffusion.generate",
        payload,
        response_topic=topic,
        correlation_data=corr,
    )
    return topic


def until_final(
    watcher: Observer, *topics: str, timeout: float = 60
) -> dict[str, list[dict[str, Any]]]:
    """Every message on each of `topics` up to its last one (done, or an error)."""
    out: dict[str, list[dict[str, Any]]] = {t: [] for t in topics}
    open_topics = set(topics)
    while open_topics:
        msg = watcher.next(lambda m: m.topic in open_topics, timeout)
        body = msg.json()
        out[msg.topic].append(body)
        if not body["ok"] or body.get("status") == "done":
            open_topics.discard(msg.topic)
    return out


def image_bytes(messages: list[dict[str, Any]]) -> bytes:
    """The image of a finished request, from its one message or its chunks (checked)."""
    result = messages[-1]["result"]
    if "image_b64" in result:
        data = base64.b64decode(result["image_b64"])
    else:
        chunks = [m["chunk"] for m in messages if m.get("status") == "chunk"]
        assert [c["index"] for c in chunks] == list(range(result["chunks"]))
        data = b"".join(base64.b64decode(c["data_b64"]) for c in chunks)
    assert hashlib.sha256(data).hexdigest() == result["sha256"]
    return data


def test_generate_over_mqtt(agent: tuple[subprocess.Popen[str], Observer]) -> None:
    proc, watcher = agent
    reported = watcher.next(
        lambda m: m.topic.endswith("/reported") and "diffusion" in m.json(), 90
    ).json()
    assert "diffusion.generate" in reported["capabilities"]["commands"]
    assert "diffusion" in reported["capabilities"]["tasks"]
    assert reported["diffusion"]["state"] == "ready" and reported["diffusion"]["adapter"]
    watcher.next(lambda m: m.topic == f"edge/{DEVICE}/events/door", 60)  # detection is running

    # Malformed requests: each gets an error reply naming the problem.
    bad_image = {
        "prompt": "a red circle",
        "condition": {"image_b64": base64.b64encode(b"no").decode()},
    }
    cases: list[tuple[dict[str, Any] | bytes, str]] = [
        ({"prompt": "a red circle", "steps": 0}, "steps"),
        ({"prompt": "a red circle", "steps": 31}, "steps"),
        ({"prompt": "a red circle", "size": [60, 64]}, "width"),
        ({"prompt": "a red circle", "size": 512}, "width"),
        ({"prompt": "a red circle", "condition": "camera:garage"}, "unknown pipeline 'garage'"),
        (bad_image, "cannot decode"),
        ({"prompt": "a red circle", "condition": {"image_b64": "%%%"}}, "image_b64"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "a red circle", "scheduler": "plms"}, "scheduler"),
        ({"prompt": "a red circle", "frobnicate": 1}, "unknown argument"),
        (b"{not json", "bad_json"),
    ]
    for i, (args, needle) in enumerate(cases):
        topic = ask(watcher, args, f"bad{i}".encode())
        [reply] = until_final(watcher, topic, timeout=15)[topic]
        assert reply["ok"] is False, (args, reply)
        assert needle in reply["error"]["message"] or needle == reply["error"]["code"], reply

    # A camera-conditioned request: progress every 2 steps, then the PNG in 2 KiB chunks.
    args = {"prompt": "a red circle on a gray background", "steps": 12, "seed": 3,
            "condition": "camera:door", "size": 64, "format": "png"}  # fmt: skip
    topic = ask(watcher, args, b"gen1")
    messages = until_final(watcher, topic)[topic]
    assert messages[0]["status"] == "queued"
    progress = [m for m in messages if m.get("status") == "progress"]
    assert [m["step"] for m in progress] == [2, 4, 6, 8, 10, 12]
    chunks = [m["chunk"] for m in messages if m.get("status") == "chunk"]
    done = messages[-1]
    assert done["ok"] and done["status"] == "done", done
    result = done["result"]
    assert result["chunks"] == len(chunks) >= 2 and "image_b64" not in result
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    assert all(c["total"] == len(chunks) and c["sha256"] == result["sha256"] for c in chunks)
    data = image_bytes(messages)
    assert len(data) == result["bytes"]
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (64, 64, 3)
    assert image.std() > 3  # an image, not a flat fill
    assert result["conditioned"] == "door" and result["seed"] == 3
    assert result["detection_fps_during"]["door"] > 0  # detection kept running meanwhile

    # A larger JPEG while more requests come in: the queue (depth 1) answers "busy".
    big = {"prompt": "a blue square", "steps": 30, "size": 128, "format": "jpeg", "quality": 80}
    first = ask(watcher, big, b"g2")
    second = ask(watcher, {"prompt": "a blue square", "steps": 4}, b"g3")
    third = ask(watcher, {"prompt": "a blue square", "steps": 4}, b"g4")
    replies = until_final(watcher, first, second, third)
    busy = [r[-1] for r in replies.values() if not r[-1]["ok"]]
    assert busy and all(b["error"]["code"] == "busy" for b in busy)
    assert replies[first][-1]["ok"], replies[first][-1]
    jpeg = image_bytes(replies[first])
    assert jpeg[:2] == b"\xff\xd8"
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None and decoded.shape == (128, 128, 3)

    telemetry = watcher.next(
        lambda m: m.topic.endswith("/telemetry") and m.json()["diffusion"]["generated"] >= 2, 30
    ).json()
    assert telemetry["diffusion"]["thread_nice"] >= 10
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0

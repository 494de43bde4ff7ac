"""The diffusion extension without a broker: factory, worker priority, chunked delivery, errors.

The agent is a small stand-in (config, a real CommandRouter whose replies are recorded, no
camera pipelines); the pipeline is the real bundled one on ONNX Runtime.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.commands import DEFERRED, CommandError, CommandRouter, Request
from agent.config import DiffusionConfig
from agent.diffusion_service import COMMAND, DiffusionService, create
from models.zoo import BUNDLED_DIR
from runtimes.errors import PackageError

PACKAGE = BUNDLED_DIR / "tiny-sd"


@dataclass
class StubConfig:
    diffusion: DiffusionConfig | None


@dataclass
class StubAgent:
    config: StubConfig
    stop_event: threading.Event = field(default_factory=threading.Event)
    pipelines: dict[str, Any] = field(default_factory=dict)
    sent: list[tuple[str, dict[str, Any], bytes | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.commands = CommandRouter(
            "dev-1", lambda t, b, c: self.sent.append((t, b, c)), self.stop_event
        )


def request(args: dict[str, Any], corr: bytes = b"1") -> Request:
    return Request(COMMAND, args, "edge/dev-1/reply/x", corr, time.time())


@pytest.fixture(scope="module")
def service() -> Any:
    agent = StubAgent(StubConfig(DiffusionConfig(model=str(PACKAGE), chunk_bytes=1024)))
    svc = create(agent)  # type: ignore[arg-type]
    assert isinstance(svc, DiffusionService)
    svc.start()
    yield agent, svc
    assert svc.stop(5)


def wait_done(agent: StubAgent, corr: bytes, timeout: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mine = [b for _t, b, c in agent.sent if c == corr]
        if mine and (not mine[-1]["ok"] or mine[-1].get("status") == "done"):
            return mine
        time.sleep(0.05)
    raise AssertionError(f"no final reply for {corr!r}: {agent.sent}")


def test_no_section_no_extension() -> None:
    assert create(StubAgent(StubConfig(None))) is None  # type: ignore[arg-type]


def test_a_broken_pipeline_fails_the_start(tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="missing"):
        create(StubAgent(StubConfig(DiffusionConfig(model=str(tmp_path)))))  # type: ignore[arg-type]


def test_generate_chunks_the_image_from_a_niced_thread(service: Any) -> None:
    agent, svc = service
    assert svc.thread_nice == min(os.nice(0) + 10, 19)  # the worker, not the process
    scene = np.full((64, 64, 3), 128, np.uint8)
    cv2.circle(scene, (32, 32), 16, (255, 255, 255), -1)
    _ok, png = cv2.imencode(".png", scene)
    args = {
        "prompt": "a white circle",
        "steps": 3,
        "condition": {"image_b64": base64.b64encode(png.tobytes()).decode()},
        "condition_type": "sobel",
    }
    assert svc.handle(request(args, b"a")) is DEFERRED
    replies = wait_done(agent, b"a")
    assert replies[0]["status"] == "queued"
    assert [r["step"] for r in replies if r.get("status") == "progress"] == [1, 2, 3]
    chunks = [r["chunk"] for r in replies if r.get("status") == "chunk"]
    result = replies[-1]["result"]
    assert result["chunks"] == len(chunks) > 1 and result["conditioned"] == "image"
    data = b"".join(base64.b64decode(c["data_b64"]) for c in chunks)
    assert hashlib.sha256(data).hexdigest() == result["sha256"] == chunks[0]["sha256"]
    assert all(len(base64.b64decode(c["data_b64"])) <= 1024 for c in chunks)
    assert svc.telemetry()["generated"] == 1 and svc.reported()["state"] == "ready"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"prompt": "x", "steps": True}, "steps"),
        ({"prompt": "x", "guidance": float("nan")}, "guidance"),
        ({"prompt": "x", "size": [64]}, "size"),
        ({"prompt": "x", "size": 64, "width": 64}, "not both"),
        ({"prompt": "x", "condition": "camera:door"}, "unknown pipeline 'door'"),
        ({"prompt": "x", "condition": {"url": "http://x"}}, "condition must be"),
        ({"prompt": "x", "format": "gif"}, "format"),
        ({"prompt": "x", "scheduler": "lcm", "steps": 50, "seed": -1}, "seed"),
        ({"prompt": 3}, "prompt"),
    ],
)
def test_bad_arguments(service: Any, args: dict[str, Any], message: str) -> None:
    _agent, svc = service
    with pytest.raises(CommandError, match=message) as err:
        svc.handle(request(args))
    assert err.value.code == "bad_args"

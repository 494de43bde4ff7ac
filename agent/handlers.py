"""The built-in remote commands: ping, status, snapshot, set_config, reload, restart."""

from __future__ import annotations

import base64
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2

from agent.annotate import draw
from agent.atomic import write_atomically
from agent.commands import CommandError, Request
from agent.config import load_config
from runtimes.errors import ConfigError

if TYPE_CHECKING:
    from agent.daemon import Agent

MAX_CONFIG_BYTES = 256 << 10


def register_builtin_commands(agent: Agent) -> None:
    router = agent.commands

    def ping(request: Request) -> dict[str, Any]:
        return {"pong": True, "echo": request.args.get("echo")}

    def status(_request: Request) -> dict[str, Any]:
        return {"reported": agent.reported(), "telemetry": agent.telemetry()}

    def snapshot(request: Request) -> dict[str, Any]:
        name = request.args.get("pipeline") or next(iter(agent.pipelines), None)
        if not isinstance(name, str) or name not in agent.pipelines:
            raise CommandError("bad_args", f"pipeline must be one of {sorted(agent.pipelines)}")
        quality = request.args.get("quality", 85)
        if not isinstance(quality, int) or not 10 <= quality <= 100:
            raise CommandError("bad_args", "quality must be an integer 10..100")
        pipe = agent.pipelines[name]
        frame = pipe.camera.newest()
        if frame is None:
            raise CommandError("no_frame", f"pipeline {name} has no frame yet")
        image = frame.image
        if request.args.get("annotate", True):
            image = draw(image, pipe.last_detections, pipe.detector.class_names)
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise CommandError("encode_failed", "JPEG encoding failed")
        return {
            "pipeline": name,
            "frame": frame.index,
            "ts": round(frame.timestamp, 3),
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "jpeg_b64": base64.b64encode(jpeg.tobytes()).decode(),
        }

    def set_config(request: Request) -> dict[str, Any]:
        text = request.args.get("toml")
        if not isinstance(text, str) or not text.strip():
            raise CommandError("bad_args", 'set_config takes {"toml": "<the whole agent.toml>"}')
        if len(text.encode()) > MAX_CONFIG_BYTES:
            raise CommandError("too_large", f"config over {MAX_CONFIG_BYTES} bytes")
        if agent.config_path is None:
            raise CommandError("no_config_file", "the agent was not started from a config file")
        target = agent.config_path
        # Validate a copy beside the real file (relative paths resolve the same way).
        fd, candidate = tempfile.mkstemp(prefix=".candidate.", suffix=".toml", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            try:
                new = load_config(candidate)
            except ConfigError as exc:
                message = str(exc).replace(candidate, "<new config>")
                raise CommandError("invalid_config", message) from None
        finally:
            Path(candidate).unlink(missing_ok=True)
        write_atomically(target, text)
        return agent.apply_config(new)

    def reload(_request: Request) -> dict[str, Any]:
        try:
            return agent.reload()
        except ConfigError as exc:
            raise CommandError("invalid_config", str(exc)) from exc

    def restart(_request: Request) -> dict[str, Any]:
        # Stop only after this reply is in the outbox, so the shutdown flush sends it.
        timer = threading.Timer(0.5, agent.request_restart)
        timer.daemon = True
        timer.start()
        return {"restarting": True}

    for name, handler in (
        ("ping", ping),
        ("status", status),
        ("snapshot", snapshot),
        ("set_config", set_config),
        ("reload", reload),
        ("restart", restart),
    ):
        router.register(name, handler)

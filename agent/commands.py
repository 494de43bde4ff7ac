"""Remote commands: `edge/<id>/cmd/<name>` -> validated -> handler -> reply on the MQTT5
response topic with the request's correlation data. Nothing a command sends can crash us.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.errors import AgentError, PayloadError
from agent.mqtt_link import InboundMessage
from runtimes.errors import EdgeAgentError

log = logging.getLogger(__name__)

MAX_ARGS_BYTES = 256 << 10


class CommandError(AgentError):
    """A command failed in a way the caller should hear about; `code` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Request:
    """A parsed command: its name, JSON object arguments, and where to answer."""

    name: str
    args: dict[str, Any]
    reply_topic: str
    correlation_data: bytes | None
    received: float


class Deferred:
    """Returned by a handler that answers later itself (streams, long jobs) through
    `CommandRouter.send`; the router then sends nothing for it."""


DEFERRED = Deferred()

Handler = Callable[[Request], "dict[str, Any] | Deferred"]
Reply = Callable[[str, dict[str, Any], bytes | None], None]  # (topic, body, correlation)


class CommandRouter:
    """Parses, queues and runs commands on its own thread; MQTT's worker only enqueues."""

    def __init__(self, device_id: str, reply: Reply, stop: threading.Event, depth: int = 32):
        self.device_id = device_id
        self.prefix = f"edge/{device_id}/cmd/"
        self._reply = reply
        self._stop = stop
        self._handlers: dict[str, Handler] = {}
        self._queue: queue.Queue[Request] = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None
        self.handled = self.failed = self.rejected = 0

    def register(self, name: str, handler: Handler) -> None:
        self._handlers[name] = handler

    @property
    def names(self) -> list[str]:
        return sorted(self._handlers)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="commands", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> bool:
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def reply_topic_for(self, message: InboundMessage, name: str) -> str:
        """The response topic if it lies under edge/<id>/reply/ (all the broker's ACL lets a
        device write replies to), else edge/<id>/reply/<name>."""
        own = f"edge/{self.device_id}/"
        wanted = message.response_topic
        if wanted and wanted.startswith(own + "reply/") and "#" not in wanted and "+" not in wanted:
            return wanted
        return f"{own}reply/{name}"

    def on_message(self, message: InboundMessage) -> None:
        """The MQTT handler: parse cheaply, answer errors at once, queue the rest."""
        name = message.topic[len(self.prefix) :] if message.topic.startswith(self.prefix) else ""
        topic = self.reply_topic_for(message, name or "invalid")
        try:
            if not name or "/" in name:
                raise CommandError("bad_topic", f"{message.topic}: expected {self.prefix}<name>")
            if len(message.payload) > MAX_ARGS_BYTES:
                raise CommandError("too_large", f"arguments over {MAX_ARGS_BYTES} bytes")
            args = message.json() if message.payload.strip() else {}
            if not isinstance(args, dict):
                raise CommandError("bad_args", "arguments must be a JSON object")
            if name not in self._handlers:
                raise CommandError(
                    "unknown_command", f"unknown command {name!r}; known: {', '.join(self.names)}"
                )
            request = Request(name, args, topic, message.correlation_data, time.time())
            self._queue.put_nowait(request)
        except PayloadError as exc:
            self._answer_error(topic, name, message.correlation_data, "bad_json", str(exc))
        except CommandError as exc:
            self._answer_error(topic, name, message.correlation_data, exc.code, str(exc))
        except queue.Full:
            self._answer_error(
                topic, name, message.correlation_data, "busy", "too many commands queued"
            )

    def _answer_error(
        self, topic: str, name: str, correlation: bytes | None, code: str, message: str
    ) -> None:
        self.rejected += 1
        log.warning("command %r rejected: %s", name, message)
        self._send(
            topic,
            {"ok": False, "command": name, "error": {"code": code, "message": message}},
            correlation,
        )

    def send(self, request: Request, body: dict[str, Any]) -> None:
        """Send one message on `request`'s reply topic (for handlers that returned DEFERRED)."""
        self._send(request.reply_topic, body, request.correlation_data)

    def _send(self, topic: str, body: dict[str, Any], correlation: bytes | None) -> None:
        try:
            json.dumps(body)
        except (TypeError, ValueError) as exc:
            body = {
                "ok": False,
                "command": body.get("command"),
                "error": {"code": "internal", "message": f"reply not serialisable: {exc}"},
            }
        try:
            self._reply(topic, body, correlation)
        except Exception:  # the reply path must never take the router down
            log.exception("could not send the reply on %s", topic)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                request = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self.run_one(request)

    def run_one(self, request: Request) -> None:
        handler = self._handlers[request.name]
        started = time.monotonic()
        try:
            result = handler(request)
            self.handled += 1
            if isinstance(result, Deferred):
                return
            body: dict[str, Any] = {"ok": True, "command": request.name, "result": result}
        except CommandError as exc:
            self.failed += 1
            body = {
                "ok": False,
                "command": request.name,
                "error": {"code": exc.code, "message": str(exc)},
            }
        except EdgeAgentError as exc:
            self.failed += 1
            body = {
                "ok": False,
                "command": request.name,
                "error": {"code": "failed", "message": str(exc)},
            }
        except Exception as exc:  # a bug in a handler is reported, not fatal
            self.failed += 1
            log.exception("command %s crashed", request.name)
            body = {
                "ok": False,
                "command": request.name,
                "error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}"},
            }
        body["elapsed_ms"] = round((time.monotonic() - started) * 1e3, 2)
        self._send(request.reply_topic, body, request.correlation_data)

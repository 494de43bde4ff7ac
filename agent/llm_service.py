"""The `llm` extension: the `llm.generate` and `llm.cancel` commands on one `Engine`,
streaming chunks (with sequence numbers) and a final message with usage on the reply topic.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.commands import DEFERRED, CommandError, Deferred, Request
from models.llm import RequestRejected
from models.llm.engine import Engine, EngineOptions, Event, Handle, resolve_model_dir
from models.llm.sampler import SamplingParams
from runtimes.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger(__name__)

COMMAND = "llm.generate"
# Chunks of one request made within this many seconds go out as one message.
STREAM_INTERVAL_S = 0.05
REQUEST_KEYS = {"prompt", "messages", "id", "timeout_s"}


def create(agent: Agent) -> LlmService | None:
    """The extension factory: None without an [llm] section."""
    if agent.config.llm is None:
        return None
    return LlmService(agent)


@dataclass
class _Stream:
    request: Request
    rid: str
    handle: Handle | None = None
    seq: int = 0
    pending: list[str] = field(default_factory=list)
    pending_tokens: int = 0
    last_sent: float = 0.0


def parse_request(
    args: dict[str, Any], limit: int
) -> tuple[str | None, list[dict[str, str]] | None, SamplingParams, float | None]:
    """Validate llm.generate arguments; raise CommandError('bad_request', ...)."""
    prompt = args.get("prompt")
    messages = args.get("messages")
    if (prompt is None) == (messages is None):
        raise CommandError("bad_request", "give exactly one of 'prompt' (string) or 'messages'")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise CommandError("bad_request", "'prompt' must be a non-empty string")
    if messages is not None:
        ok = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict)
                and set(m) == {"role", "content"}
                and all(isinstance(v, str) for v in m.values())
                for m in messages
            )
        )
        if not ok:
            raise CommandError(
                "bad_request", "'messages' must be a non-empty list of {role, content} strings"
            )
    timeout = args.get("timeout_s")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
    ):
        raise CommandError("bad_request", "'timeout_s' must be a positive number")
    try:
        params = SamplingParams.parse({k: v for k, v in args.items() if k not in REQUEST_KEYS})
    except RequestRejected as exc:
        raise CommandError(exc.code, str(exc)) from exc
    if params.max_tokens > limit:
        raise CommandError("bad_request", f"max_tokens {params.max_tokens} is over {limit}")
    return prompt, messages, params, None if timeout is None else float(timeout)


class LlmService:
    """Owns the engine and a sender thread that coalesces and publishes stream messages."""

    name = "llm"

    def __init__(self, agent: Agent) -> None:
        cfg = agent.config.llm
        assert cfg is not None
        self.cfg = cfg
        self.agent = agent
        try:
            directory = resolve_model_dir(cfg.model)
            self.engine = Engine(
                directory,
                EngineOptions(
                    max_batch=cfg.max_batch,
                    cache_mb=cfg.cache_mb,
                    block_size=cfg.block_size,
                    threads=cfg.threads,
                    nice=cfg.nice,
                    queue_depth=cfg.queue_depth,
                    max_wait_s=cfg.max_wait_s,
                ),
            )
        except ModelError as exc:
            raise ConfigError(f"llm.model: {exc}") from exc
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._outbox: queue.Queue[tuple[_Stream, Event] | None] = queue.Queue()
        self._sender = threading.Thread(target=self._send_loop, name="llm-sender", daemon=True)
        agent.commands.register(COMMAND, self.generate)
        agent.commands.register("llm.cancel", self.cancel)

    # --- commands ----------------------------------------------------------------------

    def generate(self, request: Request) -> dict[str, Any] | Deferred:
        prompt, messages, params, timeout = parse_request(request.args, self.cfg.max_tokens_limit)
        rid = request.args.get("id")
        if rid is not None and (not isinstance(rid, str) or not 0 < len(rid) <= 64):
            raise CommandError("bad_request", "'id' must be a string of 1-64 characters")
        if rid is None:
            rid = request.correlation_data.hex() if request.correlation_data else uuid.uuid4().hex
        try:
            ids = self.engine.encode(prompt, messages)
        except RequestRejected as exc:
            raise CommandError(exc.code, str(exc)) from exc
        except ModelError as exc:
            raise CommandError("bad_request", str(exc)) from exc
        stream = _Stream(request, rid)
        with self._lock:
            if rid in self._streams:
                raise CommandError("bad_request", f"request id {rid!r} is already running")
            self._streams[rid] = stream
        try:
            stream.handle = self.engine.submit(
                ids,
                params,
                on_event=lambda event: self._outbox.put((stream, event)),
                timeout_s=timeout or self.cfg.default_timeout_s,
            )
        except RequestRejected as exc:
            with self._lock:
                self._streams.pop(rid, None)
            raise CommandError(exc.code, str(exc)) from exc
        return DEFERRED

    def cancel(self, request: Request) -> dict[str, Any]:
        rid = request.args.get("id")
        if not isinstance(rid, str):
            raise CommandError("bad_request", "'id' (the llm.generate request id) is required")
        with self._lock:
            stream = self._streams.get(rid)
        if stream is None or stream.handle is None:
            raise CommandError("not_found", f"no running llm.generate with id {rid!r}")
        stream.handle.cancel()
        return {"id": rid, "cancelled": True}

    # --- the stream sender ---------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            try:
                item = self._outbox.get(timeout=STREAM_INTERVAL_S)
            except queue.Empty:
                item = ()  # type: ignore[assignment]
            if item is None:
                return
            if item:
                stream, event = item
                if event["type"] == "chunk":
                    stream.pending.append(event["text"])
                    stream.pending_tokens += len(event["token_ids"])
                else:
                    self._flush(stream)
                    self._final(stream, event)
                    continue
            now = time.monotonic()
            with self._lock:
                streams = list(self._streams.values())
            for s in streams:
                if s.pending and now - s.last_sent >= STREAM_INTERVAL_S:
                    self._flush(s)

    def _send(self, stream: _Stream, body: dict[str, Any]) -> None:
        body = {"command": COMMAND, "id": stream.rid, "seq": stream.seq, **body}
        stream.seq += 1
        self.agent.commands.send(stream.request, body)

    def _flush(self, stream: _Stream) -> None:
        if not stream.pending:
            return
        text = "".join(stream.pending)
        self._send(stream, {"ok": True, "text": text, "tokens": stream.pending_tokens})
        stream.pending.clear()
        stream.pending_tokens = 0
        stream.last_sent = time.monotonic()

    def _final(self, stream: _Stream, event: Event) -> None:
        with self._lock:
            self._streams.pop(stream.rid, None)
        if event["type"] == "done":
            result = {k: event[k] for k in ("text", "finish_reason", "usage")}
            self._send(stream, {"ok": True, "done": True, "result": result})
        else:
            self._send(
                stream,
                {
                    "ok": False,
                    "done": True,
                    "usage": event["usage"],
                    "error": {"code": event["code"], "message": event["message"]},
                },
            )

    # --- Extension ---------------------------------------------------------------------

    def start(self) -> None:
        self._sender.start()

    def stop(self, timeout: float) -> bool:
        engine_ok = self.engine.close(timeout / 2)
        self._outbox.put(None)
        if self._sender.is_alive():
            self._sender.join(timeout / 2)
        return engine_ok and not self._sender.is_alive()

    def reported(self) -> dict[str, Any]:
        return {**self.engine.describe(), "commands": [COMMAND, "llm.cancel"]}

    def telemetry(self) -> dict[str, Any]:
        return self.engine.stats()

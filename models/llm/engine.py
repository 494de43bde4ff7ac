"""The generation engine: one thread that admits requests into a running batch between
decode steps (continuous batching), samples, streams events and retires finished rows.

A request is admitted only when `BlockBudget` can reserve its prompt plus `max_tokens`;
otherwise it waits (FIFO) up to `max_wait_s`, or is refused at once if it can never fit.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.llm import GenerationError, RequestRejected
from models.llm.decoder import DecoderBatch, open_decoder
from models.llm.kv_cache import BlockBudget
from models.llm.sampler import Sampler, SamplingParams
from models.llm.tokenizer import StreamDecoder, TextTokenizer

log = logging.getLogger(__name__)

Event = dict[str, Any]


@dataclass(frozen=True)
class EngineOptions:
    max_batch: int = 8
    cache_mb: float = 16.0
    block_size: int = 16
    threads: int | None = None
    nice: int = 0
    queue_depth: int = 64
    max_wait_s: float = 30.0
    context_length: int | None = None


@dataclass(eq=False)
class Handle:
    """One submitted request: its events (chunks, then one `done` or `error`), and cancel."""

    key: int
    prompt_ids: list[int]
    params: SamplingParams
    deadline: float | None
    on_event: Callable[[Event], None] | None
    submitted: float = field(default_factory=time.monotonic)
    events: queue.SimpleQueue[Event] = field(default_factory=queue.SimpleQueue)
    done: threading.Event = field(default_factory=threading.Event)
    final: Event | None = None
    cancelled: bool = False
    # engine-side state
    generated: list[int] = field(default_factory=list)
    seq: int = 0
    first_token_at: float | None = None
    admitted_at: float | None = None
    sampler: Sampler | None = None
    stream: StreamDecoder | None = None
    greedy: bool = False  # the sampler is a plain argmax: the engine's batched one will do
    stop_ids: frozenset[int] = frozenset()  # tokens that end the request

    def cancel(self) -> None:
        self.cancelled = True

    def iter_events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events as they come, ending after the final one."""
        while True:
            event = self.events.get(timeout=timeout)
            yield event
            if event["type"] in ("done", "error"):
                return

    def result(self, timeout: float | None = None) -> Event:
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.key} did not finish within {timeout} s")
        assert self.final is not None
        return self.final


def context_length_of(directory: Path) -> int:
    for name, keys in (
        ("model.json", ("params", "context_length")),
        ("genai_config.json", ("model", "context_length")),
        ("config.json", ("max_position_embeddings",)),
    ):
        path = directory / name
        if not path.is_file():
            continue
        try:
            value: Any = json.loads(path.read_text(encoding="utf-8"))
            for key in keys:
                value = value[key]
            return int(value)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return 2048


class Engine:
    """Serves one model; thread-safe `submit`; call `close` to stop."""

    def __init__(self, directory: Path, options: EngineOptions | None = None) -> None:
        self.directory = Path(directory)
        self.options = opts = options or EngineOptions()
        if opts.max_batch < 1 or opts.queue_depth < 1:
            raise ValueError("max_batch and queue_depth must be at least 1")
        self.tokenizer = TextTokenizer(self.directory)
        self.context_length = opts.context_length or context_length_of(self.directory)
        self._keys = itertools.count(1)
        self._inbox: queue.SimpleQueue[Handle] = queue.SimpleQueue()
        self._waiting: collections.deque[Handle] = collections.deque()
        self._running: list[Handle] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self.batch: DecoderBatch | None = None
        self.budget = BlockBudget(1, opts.block_size)
        self.steps = self.tokens_out = self.prefills = self.rejected = 0
        self.batch_rows_sum = self.peak_batch = 0
        self._thread = threading.Thread(target=self._main, name="llm-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    # --- the public side -------------------------------------------------------------

    def encode(self, prompt: str | None, messages: Sequence[dict[str, str]] | None) -> list[int]:
        if messages:
            return self.tokenizer.encode_chat(messages)
        if prompt is None:
            raise RequestRejected("bad_request", "give a prompt or messages")
        return self.tokenizer.encode(prompt)

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        on_event: Callable[[Event], None] | None = None,
        timeout_s: float | None = None,
    ) -> Handle:
        """Queue a request; raise RequestRejected if it can never run or the queue is full."""
        if self._stop.is_set():
            raise RequestRejected("stopped", "the LLM engine is stopping")
        if not prompt_ids:
            raise RequestRejected("bad_request", "the prompt encodes to no tokens")
        need = len(prompt_ids) + params.max_tokens
        if need > self.context_length:
            raise RequestRejected(
                "too_long",
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the model's context of {self.context_length} tokens",
            )
        if not self.budget.fits_alone(need):
            raise RequestRejected(
                "cache_full",
                f"needs {self.budget.blocks_for(1, need)} KV blocks; the cache has "
                f"{self.budget.total_blocks} in all (raise llm.cache_mb)",
            )
        if self._inbox.qsize() + len(self._waiting) >= self.options.queue_depth:
            self.rejected += 1
            raise RequestRejected("queue_full", f"{self.options.queue_depth} requests waiting")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        handle = Handle(next(self._keys), list(prompt_ids), params, deadline, on_event)
        self._inbox.put(handle)
        self._wake.set()
        return handle

    def stats(self) -> dict[str, Any]:
        return {
            "running": len(self._running),
            "waiting": len(self._waiting) + self._inbox.qsize(),
            "kv_blocks_used": self.budget.used_blocks,
            "kv_blocks_total": self.budget.total_blocks,
            "block_size": self.budget.block_size,
            "steps": self.steps,
            "prefills": self.prefills,
            "tokens_generated": self.tokens_out,
            "peak_batch": self.peak_batch,
            "mean_batch": round(self.batch_rows_sum / self.steps, 2) if self.steps else 0.0,
            "rejected": self.rejected,
        }

    def describe(self) -> dict[str, Any]:
        batch = self.batch
        return {
            "model": str(self.directory),
            "layout": batch.layout if batch else None,
            "context_length": self.context_length,
            "max_batch": self.options.max_batch,
            "kv_cache_bytes": batch.arena.nbytes if batch else 0,
        }

    def close(self, timeout: float = 5.0) -> bool:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- the engine thread -----------------------------------------------------------

    def _main(self) -> None:
        try:
            if self.options.nice > 0:  # per thread on Linux; ORT's pool threads inherit it
                tid = threading.get_native_id()
                os.setpriority(
                    os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + self.options.nice
                )
            o = self.options
            self.batch = open_decoder(self.directory, o.cache_mb, o.block_size, o.threads)
            self.budget = BlockBudget(
                self.batch.arena.capacity_tokens // o.block_size, o.block_size
            )
        except BaseException as exc:
            self._load_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                self._loop_once()
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            log.exception("LLM engine failed")
            for h in [*self._running, *self._waiting]:
                self._finish(h, "error", error=("internal", f"{type(exc).__name__}: {exc}"))
        finally:
            for h in [*self._running, *self._waiting, *self._drain_inbox()]:
                if not h.done.is_set():
                    self._finish(h, "error", error=("stopped", "the LLM engine stopped"))

    def _drain_inbox(self) -> list[Handle]:
        out = []
        while True:
            try:
                out.append(self._inbox.get_nowait())
            except queue.Empty:
                return out

    def _loop_once(self) -> None:
        if not self._inbox.empty():
            self._waiting.extend(self._drain_inbox())
        now = time.monotonic()
        for h in list(self._waiting):
            reason = self._expired(h, now)
            if reason is None and now - h.submitted > self.options.max_wait_s:
                self._waiting.remove(h)
                self.rejected += 1
                self._finish(
                    h,
                    "error",
                    error=(
                        "cache_full",
                        (
                            f"waited {self.options.max_wait_s:g} s for KV cache blocks "
                            f"({self.budget.used_blocks}/{self.budget.total_blocks} in use)"
                        ),
                    ),
                )
            elif reason is not None:
                self._waiting.remove(h)
                self._finish(h, reason)
        gone = [i for i, h in enumerate(self._running) if self._expired(h, now)]
        if gone:
            for i in gone:
                self._finish(self._running[i], self._expired(self._running[i], now) or "cancelled")
            self._retire(set(gone))
        self._admit()
        if not self._running:
            self._wake.wait(0.05)
            self._wake.clear()
            return
        assert self.batch is not None
        tokens = [h.generated[-1] for h in self._running]
        try:
            logits = self.batch.step(tokens)
        except Exception as exc:  # fail this batch, keep serving the next requests
            log.exception("LLM decode step failed")
            for h in self._running:
                self._finish(h, "error", error=("failed", str(exc)))
            self._retire(set(range(len(self._running))))
            return
        self.steps += 1
        self.batch_rows_sum += len(tokens)
        self.peak_batch = max(self.peak_batch, len(tokens))
        picks = logits.argmax(axis=-1).tolist()
        done = [i for i, h in enumerate(self._running) if self._take(h, logits[i], picks[i])]
        if done:
            self._retire(set(done))

    @staticmethod
    def _expired(h: Handle, now: float) -> str | None:
        if h.cancelled:
            return "cancelled"
        if h.deadline is not None and now > h.deadline:
            return "deadline"
        return None

    def _admit(self) -> None:
        assert self.batch is not None
        while self._waiting and len(self._running) < self.options.max_batch:
            h = self._waiting[0]
            if not self.budget.reserve(h.key, len(h.prompt_ids) + h.params.max_tokens):
                return  # FIFO: the head waits for blocks; nobody overtakes it
            self._waiting.popleft()
            h.admitted_at = time.monotonic()
            h.sampler = Sampler(h.params)
            h.greedy = h.sampler.plain_greedy
            h.stop_ids = frozenset(h.params.stop_token_ids) | (
                frozenset() if h.params.ignore_eos else self.tokenizer.eos_ids
            )
            h.stream = StreamDecoder(self.tokenizer, h.params.stop)
            try:
                logits = self.batch.add(h.prompt_ids, self.budget.row_tokens)
            except Exception as exc:
                self.budget.release(h.key)
                self._finish(h, "error", error=("failed", str(exc)))
                continue
            self.prefills += 1
            self._running.append(h)
            if self._take(h, logits):
                self._retire({len(self._running) - 1})

    def _take(self, h: Handle, logits: np.ndarray, argmax: int | None = None) -> bool:
        """Sample the next token of `h`, stream it; True when `h` is finished."""
        assert h.sampler is not None and h.stream is not None
        if argmax is not None and h.greedy:
            token = argmax
        else:
            seen = [*h.prompt_ids, *h.generated] if h.params.repetition_penalty != 1.0 else []
            token = h.sampler(logits, seen)
        if h.first_token_at is None:
            h.first_token_at = time.monotonic()
        if token in h.stop_ids:
            self._finish(h, "stop")
            return True
        h.generated.append(token)
        self.tokens_out += 1
        stream = h.stream
        piece = stream.push(token)
        if piece or not stream.stopped:
            self._emit(h, {"type": "chunk", "text": piece, "token_ids": [token]})
        if stream.stopped:
            self._finish(h, "stop")
            return True
        if len(h.generated) >= h.params.max_tokens:
            self._finish(h, "length")
            return True
        return False

    def _retire(self, rows: set[int]) -> None:
        assert self.batch is not None
        for i in rows:
            self.budget.release(self._running[i].key)
        keep = [i for i in range(len(self._running)) if i not in rows]
        self.batch.remove(keep, self.budget.row_tokens)
        self._running = [self._running[i] for i in keep]

    def _emit(self, h: Handle, event: Event) -> None:
        event["seq"] = h.seq
        h.seq += 1
        h.events.put(event)
        if h.on_event is not None:
            try:
                h.on_event(event)
            except Exception:  # a consumer's bug must not stop the batch
                log.exception("LLM event callback failed")

    def _finish(self, h: Handle, reason: str, error: tuple[str, str] | None = None) -> None:
        if h.done.is_set():
            return
        now = time.monotonic()
        if h.stream is not None:
            tail = h.stream.flush()
            if tail:
                self._emit(h, {"type": "chunk", "text": tail, "token_ids": []})
        n = len(h.generated)
        first = h.first_token_at
        usage = {
            "prompt_tokens": len(h.prompt_ids),
            "completion_tokens": n,
            "queue_s": round((h.admitted_at or now) - h.submitted, 4),
            "ttft_s": round(first - h.submitted, 4) if first else None,
            "total_s": round(now - h.submitted, 4),
            "tokens_per_s": round((n - 1) / (now - first), 2) if first and n > 1 else None,
        }
        if error is not None:
            event: Event = {"type": "error", "code": error[0], "message": error[1], "usage": usage}
        else:
            text = h.stream.text if h.stream else ""
            event = {
                "type": "done",
                "finish_reason": reason,
                "text": text,
                "token_ids": list(h.generated),
                "usage": usage,
            }
        h.final = event
        self._emit(h, event)
        h.done.set()


def generate(
    engine: Engine, prompt_ids: list[int], params: SamplingParams, timeout: float = 60.0
) -> Event:
    """Run one request to the end (for scripts and tests); raise on an error event."""
    final = engine.submit(prompt_ids, params).result(timeout)
    if final["type"] == "error":
        raise GenerationError(f"{final['code']}: {final['message']}")
    return final


def resolve_model_dir(reference: str | Path) -> Path:
    """An LLM package directory, its model.json, or the name of a bundled one."""
    from models.zoo import BUNDLED_DIR

    path = Path(reference)
    if path.name == "model.json" and path.is_file():
        return path.parent
    if path.is_dir():
        return path
    candidate = BUNDLED_DIR / str(reference)
    if "/" not in str(reference) and candidate.is_dir():
        return candidate
    from runtimes.errors import ModelNotFound

    known = sorted(
        p.name
        for p in BUNDLED_DIR.glob("*")
        if (p / "tokenizer.json").is_file() and (p / "model.json").is_file()
    )
    raise ModelNotFound(
        f"{reference}: no such LLM directory or bundled LLM (bundled: {', '.join(known)})"
    )

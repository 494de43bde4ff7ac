"""Serial peripherals over pyserial: `SerialSink` sends detection events to a UART device,
`SerialSource` reads GPS and key=value sensors; both reopen a port that disappears.

Sink wire formats (`format`):
    jsonl    one compact JSON object per line ("\\n"); with `ack`, the object carries
             "link_seq": n and the device answers a line "ACK n" or "NAK n".
    binary   frames as in `agent.serial_frame` (0xAA 0x55, length, type, seq, payload,
             CRC-16/CCITT-FALSE); the device answers an ACK or NAK frame with the same seq.
With `ack`, a NAK or no answer within `ack_timeout_s` resends the same bytes, up to
`retries` times; then the event counts as `failed`. Events go at most `max_rate_hz` a second
(token bucket of `burst`); events that arrive while one waits for its turn replace it (the
newest wins) and count as `coalesced`. `send()` never blocks: a full queue drops its oldest
event (`dropped_full`). A port that fails (unplugged: SerialException / OSError) is closed
and reopened with jittered exponential backoff; the event in flight goes back to the queue.

Source lines (see `agent.serial_lines`): NMEA GGA/RMC and key=value; `latest()` keeps the
newest GPS fields and readings with their time, rejected lines are counted per kind.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from typing import Any

import serial

from agent.serial_frame import FrameDecoder, FrameType, encode_frame
from agent.serial_lines import GpsUpdate, LineSplitter, Readings, Rejected, parse_line
from agent.serial_port import (
    ALLOWED,
    PortState,
    PortWorker,
    ReopeningPort,
    SerialPortConfig,
    SerialSinkConfig,
    SerialSourceConfig,
)

__all__ = [
    "ALLOWED",
    "PortState",
    "ReopeningPort",
    "SerialPortConfig",
    "SerialSink",
    "SerialSinkConfig",
    "SerialSource",
    "SerialSourceConfig",
]

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.2  # the sink checks the port (unplugged?) this often when it has no event


class _TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def delay(self) -> float:
        """Seconds until one token is there (0 when it is)."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def take(self) -> None:
        self.tokens -= 1.0


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class SerialSink(PortWorker):
    """Sends events to a UART device from its own thread; `send()` never blocks."""

    kind = "serial-sink"

    def __init__(self, config: SerialSinkConfig, stop_event: threading.Event | None = None) -> None:
        super().__init__(config, stop_event)
        self.config = config
        self._cond = threading.Condition(self._lock)
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._bucket = (
            _TokenBucket(config.max_rate_hz, config.burst) if config.max_rate_hz else None
        )
        self._seq = 0
        self._decoder = FrameDecoder(max_payload=16)
        self._lines = LineSplitter(max_line=64)
        self._inflight: dict[str, Any] | None = None
        self.counts: collections.Counter[str] = collections.Counter()

    def send(self, event: dict[str, Any]) -> None:
        """Queue one event; when the queue is full the oldest is dropped and counted."""
        with self._cond:
            if len(self._queue) >= self.config.queue_size:
                self._queue.popleft()
                self.counts["dropped_full"] += 1
            self._queue.append(event)
            self.counts["queued"] += 1
            self._cond.notify()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self.counts)
            depth = len(self._queue)
        return {**self._port.snapshot(), "queue": depth, **counts}

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _on_lost(self) -> None:
        self._decoder = FrameDecoder(max_payload=16)
        self._lines = LineSplitter(max_line=64)
        event, self._inflight = self._inflight, None
        if event is not None:  # not delivered for sure: it goes out again after the reopen
            with self._cond:
                if len(self._queue) >= self.config.queue_size:
                    self.counts["dropped_full"] += 1
                else:
                    self._queue.appendleft(event)
                self.counts["write_errors"] += 1

    def _step(self, port: serial.SerialBase) -> None:
        event = self._next_event()
        if event is None:
            self._drain(port)
            return
        self._inflight = event
        self._deliver(port, event)
        self._inflight = None

    def _next_event(self) -> dict[str, Any] | None:
        with self._cond:
            if not self._queue:
                self._cond.wait(IDLE_POLL_S)
            if not self._queue:
                return None
            event = self._queue.popleft()
        if self._bucket is None:
            return event
        while (wait := self._bucket.delay()) > 0:
            with self._cond:
                self._cond.wait(wait)
                while self._queue:  # newer events replace the one waiting for its turn
                    event = self._queue.popleft()
                    self.counts["coalesced"] += 1
            if self._stop.is_set():
                return None
        self._bucket.take()
        return event

    def _encode(self, event: dict[str, Any], seq: int) -> bytes | None:
        body = (
            {**event, "link_seq": seq}
            if self.config.ack and self.config.format == "jsonl"
            else event
        )
        try:
            text = json.dumps(
                body, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_jsonable
            )
        except (TypeError, ValueError) as exc:
            log.warning("serial sink: event not JSON serialisable, dropped: %s", exc)
            self._count("unencodable")
            return None
        payload = text.encode("utf-8")
        if len(payload) > self.config.max_payload:
            self._count("too_large")
            return None
        if self.config.format == "binary":
            return encode_frame(FrameType.EVENT, seq, payload)
        return payload + b"\n"

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def _deliver(self, port: serial.SerialBase, event: dict[str, Any]) -> None:
        seq = self._seq
        data = self._encode(event, seq)
        if data is None:
            return
        self._seq = (seq + 1) & 0xFFFF
        tries = 1 + (self.config.retries if self.config.ack else 0)
        for attempt in range(tries):
            if attempt:
                self._count("resends")
            port.write(data)
            port.flush()
            if not self.config.ack:
                self._count("sent")
                return
            reply = self._await_reply(port, seq)
            if reply is FrameType.ACK:
                self._count("sent")
                self._count("acked")
                return
            self._count("naks" if reply is FrameType.NAK else "ack_timeouts")
            if self._stop.is_set():
                break
        self._count("failed")
        log.debug("serial sink: event seq %d failed after %d tries", seq, tries)

    def _await_reply(self, port: serial.SerialBase, seq: int) -> FrameType | None:
        deadline = time.monotonic() + self.config.ack_timeout_s
        while not self._stop.is_set():
            data = port.read(max(1, port.in_waiting))
            for kind, got in self._replies(data):
                if got == seq:
                    return kind
                self._count("stray_replies")
            if time.monotonic() >= deadline:
                break
        return None

    def _drain(self, port: serial.SerialBase) -> None:
        """Idle: read what the device sent (stray replies); fails when it is unplugged."""
        waiting = port.in_waiting
        if waiting:
            self._count("stray_replies", len(self._replies(port.read(waiting))))

    def _replies(self, data: bytes) -> list[tuple[FrameType, int]]:
        if not data:
            return []
        out: list[tuple[FrameType, int]] = []
        if self.config.format == "binary":
            for frame in self._decoder.feed(data):
                if frame.type in (FrameType.ACK, FrameType.NAK):
                    out.append((FrameType(frame.type), frame.seq))
            return out
        for line in self._lines.feed(data):
            if isinstance(line, Rejected):
                continue
            word, _, number = line.strip().partition(" ")
            if word.upper() in ("ACK", "NAK") and number.strip().isdigit():
                kind = FrameType.ACK if word.upper() == "ACK" else FrameType.NAK
                out.append((kind, int(number)))
        return out


class SerialSource(PortWorker):
    """Reads sensor lines from its own thread; `latest()` has the newest values."""

    kind = "serial-source"

    def __init__(
        self, config: SerialSourceConfig, stop_event: threading.Event | None = None
    ) -> None:
        super().__init__(config, stop_event)
        self.config = config
        self._splitter = LineSplitter(max_line=config.max_line)
        self._gps: dict[str, Any] = {}
        self._sensors: dict[str, dict[str, Any]] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        self.rejected: collections.Counter[str] = collections.Counter()

    def latest(self) -> dict[str, Any]:
        """{"gps": {lat, lon, fix_quality, satellites, altitude_m, speed_kmh, utc, ..., ts},
        "sensors": {key: {"value": v, "ts": t}}}; ts are time.time() of arrival."""
        with self._lock:
            return {
                "gps": dict(self._gps),
                "sensors": {k: dict(v) for k, v in self._sensors.items()},
            }

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self._port.snapshot(), **self.counts, "rejected": dict(self.rejected)}

    def _on_lost(self) -> None:
        self._splitter = LineSplitter(max_line=self.config.max_line)

    def _step(self, port: serial.SerialBase) -> None:
        data = port.read(max(1, port.in_waiting))
        if data:
            for line in self._splitter.feed(data):
                self._handle(line)

    def _handle(self, line: str | Rejected) -> None:
        parsed = parse_line(line) if isinstance(line, str) else line
        now = round(time.time(), 3)
        with self._lock:
            if isinstance(parsed, Rejected):
                self.rejected[parsed.kind] += 1
                return
            self.counts["lines"] += 1
            if isinstance(parsed, GpsUpdate):
                self._merge_gps(parsed, now)
            elif isinstance(parsed, Readings):
                self.counts["readings"] += 1
                for key, value in parsed.values.items():
                    self._sensors[key] = {"value": value, "ts": now}

    def _merge_gps(self, update: GpsUpdate, now: float) -> None:
        self.counts["gps"] += 1
        gps = self._gps
        gps.update(update.fields)
        gps["talker"] = update.talker
        gps["ts"] = now
        if "lat" in update.fields and "lon" in update.fields:
            gps["position_ts"] = now
        if "date" in gps and "utc_time" in gps:
            gps["utc"] = f"{gps['date']}T{gps['utc_time']}Z"

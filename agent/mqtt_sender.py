"""The outbox sender: outbox rows to paho in sequence order, each removed on its PUBACK.

At most a window of messages is unacknowledged; paho itself resends those after a reconnect.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import OutboxError
from agent.outbox import Outbox

__all__ = ["OutboxSender", "SendWindow"]

log = logging.getLogger(__name__)

_TICK_S = 0.2  # how often an idle sender looks at the stop event
_LOOK_S = 1.0  # how often it reads the outbox without being woken (a lost wake costs 1 s)
_WAKE = object()


@dataclass(frozen=True)
class SendWindow:
    """What the link allows now: whether it is connected, how many unacked, the packet cap."""

    connected: bool
    limit: int
    max_packet: int | None


@dataclass(frozen=True)
class _Ack:
    mid: int
    code: int
    reason: str


class OutboxSender:
    """The `mqtt-sender` thread's work; the link owns the thread, the client and the window.

    `on_publish` is paho's callback (it only hands the PUBACK over); `wake()` says the
    outbox or the window changed. On stop it keeps sending until the outbox is empty, the
    link is down or `deadline()` has passed, then sets `done`.
    """

    def __init__(
        self,
        outbox: Outbox,
        client: paho.Client,
        stop: threading.Event,
        window: Callable[[], SendWindow],
        deadline: Callable[[], float],
    ) -> None:
        self._outbox = outbox
        self._client = client
        self._stop = stop
        self._window = window
        self._deadline = deadline
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._wake_pending = threading.Event()
        self._inflight: dict[int, int] = {}  # paho mid -> outbox seq
        self._cursor = 0  # the highest seq handed to paho
        self.done = threading.Event()
        self.inflight = 0  # for status(): len(_inflight) as of the last pass
        self.rejected = 0  # refused by the broker (PUBACK >= 0x80) or never sendable

    def wake(self) -> None:
        """New rows, or the connection or window changed: look at the outbox again."""
        if not self._wake_pending.is_set():
            self._wake_pending.set()
            self._queue.put(_WAKE)

    def on_publish(
        self, _c: paho.Client, _u: Any, mid: int, reason: ReasonCode, _p: Properties | None
    ) -> None:
        """paho's on_publish (network thread): hand the acknowledgement over, never raise."""
        with contextlib.suppress(Exception):  # nothing may escape into paho's loop
            self._queue.put(_Ack(mid, int(reason.value), str(reason)))

    def run(self) -> None:
        """The thread body: settle acks, send more, until stopped and flushed."""
        last_look = 0.0
        try:
            while not (self._stop.is_set() and self._flushed()):
                try:
                    woken = self._take_queue()
                    if woken or time.monotonic() - last_look > _LOOK_S:
                        last_look = time.monotonic()
                        self._send_more()
                except OutboxError as exc:
                    log.error("MQTT sender: %s", exc)
                    self._stop.wait(1.0)
                except Exception:  # a bug must not end the sending for good
                    log.exception("MQTT sender: unexpected error")
                    self._stop.wait(1.0)
                self.inflight = len(self._inflight)
        finally:
            self.done.set()

    def _take_queue(self) -> bool:
        """Settle the acknowledgements that came in; True if anything arrived."""
        try:
            item = self._queue.get(timeout=_TICK_S)
        except queue.Empty:
            return False
        while True:
            if isinstance(item, _Ack):
                self._settle(item)
            else:
                self._wake_pending.clear()
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return True

    def _flushed(self) -> bool:
        """While stopping: nothing left to send, or no way or no time to send it."""
        if not self._window().connected or time.monotonic() >= self._deadline():
            return True
        try:
            return not self._inflight and not self._outbox.peek_batch(1, self._cursor)
        except OutboxError:
            return True

    def _settle(self, ack: _Ack) -> None:
        seq = self._inflight.pop(ack.mid, None)
        if seq is None:
            return  # the link's own status messages, or a QoS 0 message already settled
        if ack.code >= 0x80:  # retrying would not help (not authorized, bad topic, ...)
            self.rejected += 1
            log.warning("broker refused outbox message %d: %s (0x%02x)", seq, ack.reason, ack.code)
        try:
            self._outbox.ack(seq)
        except OutboxError as exc:  # it stays queued and goes again after a restart
            log.error("MQTT sender: %s", exc)

    def _send_more(self) -> None:
        """Hand the next outbox rows to paho while connected and below the window."""
        window = self._window()
        room = window.limit - len(self._inflight)
        if not window.connected or room <= 0:
            return
        for message in self._outbox.peek_batch(room, after_seq=self._cursor):
            size = len(message.payload) + len(message.topic) + 64
            if window.max_packet is not None and size > window.max_packet:
                self._reject(message.seq, f"above the broker's maximum packet {window.max_packet}")
                continue
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = ("seq", str(message.seq))  # the fleet side dedups by it
            if message.correlation_data is not None:
                props.CorrelationData = message.correlation_data
            try:
                info = self._client.publish(
                    message.topic, message.payload, message.qos, message.retain, props
                )
            except ValueError as exc:  # a topic paho will never send
                self._reject(message.seq, str(exc))
                continue
            if message.qos == 0:
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return  # not queued: again once connected
                # QoS 0 has no acknowledgement: queued for the socket is as far as it goes.
                self._outbox.ack(message.seq)
            elif info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                self._inflight[info.mid] = message.seq  # NO_CONN: paho keeps it, sends later
            else:
                return
            self._cursor = message.seq

    def _reject(self, seq: int, why: str) -> None:
        self.rejected += 1
        log.warning("outbox message %d cannot be sent, dropped: %s", seq, why)
        self._outbox.ack(seq)
        self._cursor = seq

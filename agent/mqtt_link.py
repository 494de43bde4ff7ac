"""The MQTT 5 link to the fleet: connection, birth and will, subscriptions, outbox sender.

paho's callbacks only hand over to queues; three threads own the rest (see `MqttLink`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from importlib import metadata
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import AgentConfig, MqttConfig
from agent.errors import ConfigError, LinkError, OutboxError
from agent.mqtt_inbound import Handler, HandlerTable, InboundMessage, inbound_from_paho
from agent.mqtt_sender import OutboxSender, SendWindow
from agent.outbox import Outbox, Priority

__all__ = [
    "InboundMessage",
    "LinkState",
    "LinkStatus",
    "MqttLink",
    "reconnect_delay",
    "status_topic",
]

log = logging.getLogger(__name__)

_TICK_S = 0.2  # how often an idle thread looks at the stop event
_OFFLINE_S = 1.0  # of the stop budget, kept for the offline status and DISCONNECT
_PACKET_OVERHEAD = 64 << 10  # topic and properties on top of max_inbound_bytes
_MAX_INBOUND_QUEUED = 1000  # inbound messages waiting for handlers, at most


def status_topic(device_id: str) -> str:
    """`edge/<id>/status`: retained online/offline, also the last will."""
    return f"edge/{device_id}/status"


class LinkState(str, Enum):
    """Where the link stands; only a CONNACK with a success reason code means CONNECTED."""

    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"  # lost, or the broker could not be reached
    REFUSED = "refused"  # the broker answered CONNACK with a failure reason code
    STOPPED = "stopped"


@dataclass(frozen=True)
class LinkStatus:
    """A snapshot of the link for telemetry and tests."""

    state: LinkState
    reason: str  # why the state is what it is ("" when connected)
    since: float  # time.time() of the last state change
    connects: int  # accepted CONNACKs so far
    session_present: bool
    inflight: int  # outbox messages sent, not yet acknowledged
    rejected: int  # outbox messages the broker refused (PUBACK reason >= 0x80) or unsendable
    inbound_dropped: int  # inbound messages dropped: handlers too slow
    oversize: int  # inbound messages dropped: payload above max_inbound_bytes
    handler_errors: int  # handler calls that raised


# What paho's callbacks hand to the worker thread.
@dataclass(frozen=True)
class _Connack:
    code: int
    reason: str
    session_present: bool
    receive_maximum: int | None
    maximum_packet_size: int | None


@dataclass(frozen=True)
class _Lost:
    reason: str
    unreachable: bool = False  # no TCP/TLS connection at all (so no CONNACK to keep)


@dataclass(frozen=True)
class _Suback:
    mid: int
    failures: tuple[str, ...]


@dataclass(frozen=True)
class _Inbound:
    message: InboundMessage


@dataclass(frozen=True)
class _Oversize:
    topic: str
    size: int


@dataclass
class _Counters:
    connects: int = 0
    inbound_dropped: int = 0
    oversize: int = 0
    last_put_error_log: float = field(default=0.0)


class MqttLink:
    """The device's one MQTT connection; `start()`, `subscribe()`, `publish()`, `stop()`.

    Threads: `mqtt-network` (the only one that reads/writes the socket: connect, loop,
    reconnect with jittered exponential backoff), `mqtt-worker` (connection events and
    message handlers, in arrival order; a handler must return quickly) and `mqtt-sender`
    (outbox -> broker in sequence order, at most max_inflight unacknowledged; a row is
    removed when its PUBACK arrives). They all watch one stop event.
    """

    def __init__(
        self,
        device_id: str,
        mqtt: MqttConfig,
        outbox: Outbox,
        *,
        client_id: str | None = None,
        stop_event: threading.Event | None = None,
    ) -> None:
        self.device_id = device_id
        self.status_topic = status_topic(device_id)
        self._mqtt = mqtt
        self._outbox = outbox
        self._stop = stop_event or threading.Event()
        self._lock = threading.Lock()
        self._state_changed = threading.Condition(self._lock)
        self._state = LinkState.NEW
        self._reason = ""
        self._since = time.time()
        self._session_present = False
        self._receive_maximum: int | None = None
        self._maximum_packet_size: int | None = None
        # True from the CONNACK handler's snapshot of the subscriptions until the link drops:
        # subscribe() then sends SUBSCRIBE itself, before that the next CONNACK does it.
        self._subscriptions_live = False
        self._counters = _Counters()
        self._handlers = HandlerTable()
        self._inline: dict[str, Handler] = {}  # exact topic -> handler on the network thread
        self._events: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._network_done = threading.Event()
        self._deadline: float | None = None
        self._threads: list[threading.Thread] = []
        self._started_at = time.time()
        self._version = _agent_version()
        self._client = self._make_client(client_id or device_id)
        self._sender = OutboxSender(
            outbox, self._client, self._stop, self._send_window, self._shutdown_deadline
        )
        self._client.on_publish = self._sender.on_publish

    @classmethod
    def from_config(
        cls, config: AgentConfig, outbox: Outbox, *, stop_event: threading.Event | None = None
    ) -> MqttLink:
        """The link for an agent config."""
        return cls(
            config.device.id,
            config.mqtt,
            outbox,
            client_id=config.client_id,
            stop_event=stop_event,
        )

    # --- public API -------------------------------------------------------------------

    def topic(self, suffix: str) -> str:
        """`edge/<id>/<suffix>`."""
        return f"edge/{self.device_id}/{suffix}"

    def start(self) -> None:
        """Start the three threads; the link connects and keeps reconnecting until stop()."""
        if self._threads:
            raise LinkError("the MQTT link was already started")
        self._set_state(LinkState.CONNECTING, f"connecting to {self._address}")
        for name, target in (
            ("mqtt-network", self._run_network),
            ("mqtt-worker", self._run_worker),
            ("mqtt-sender", self._sender.run),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()

    def subscribe(
        self, topic_filter: str, handler: Handler, qos: int = 1, *, inline: bool = False
    ) -> None:
        """Call `handler` for every message matching `topic_filter`; kept across reconnects.

        Handlers run on the link's worker thread. `inline=True` (an exact topic, no
        wildcards) runs the handler on the network thread instead, saving a thread hop per
        message: for a handler that only hands the message over (the OTA chunk inbox) and
        must never block or raise. It alone gets that topic's messages.
        """
        if inline and ("+" in topic_filter or "#" in topic_filter):
            raise ValueError(f"an inline handler needs an exact topic, not {topic_filter!r}")
        with self._lock:
            self._handlers.add(topic_filter, handler, qos)
            if inline:
                self._inline[topic_filter] = handler
            live = self._subscriptions_live
        if live:  # otherwise the next CONNACK subscribes everything
            self._client.subscribe(topic_filter, options=SubscribeOptions(qos=qos))

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        priority: Priority = Priority.EVENT,
        correlation_data: bytes | None = None,
    ) -> int | None:
        """Queue a message in the outbox (durable) and wake the sender.

        Returns its sequence number; None if the outbox bound dropped it or the outbox
        cannot be written (logged at most once a minute, counted in outbox stats).
        """
        try:
            seq = self._outbox.put(
                topic,
                payload,
                qos=qos,
                retain=retain,
                priority=priority,
                correlation_data=correlation_data,
            )
        except OutboxError as exc:
            now = time.monotonic()
            if now - self._counters.last_put_error_log > 60.0:
                self._counters.last_put_error_log = now
                log.error("message for %s not queued: %s", topic, exc)
            return None
        self._sender.wake()
        return seq

    def publish_volatile(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        correlation_data: bytes | None = None,
    ) -> bool:
        """Hand a message straight to paho, without the outbox: for messages that are
        worthless after a restart and that their sender repeats itself when unanswered
        (the OTA downloader's chunk requests). Saves the outbox's SQLite writes (an insert
        and a delete per message). False when the link is not connected: nothing is queued.
        """
        with self._lock:
            if self._state is not LinkState.CONNECTED:
                return False
        props = Properties(PacketTypes.PUBLISH)
        if correlation_data is not None:
            props.CorrelationData = correlation_data
        try:
            info = self._client.publish(topic, payload, qos, False, props)
        except ValueError:  # a topic paho will never send
            log.exception("volatile publish to %r refused", topic)
            return False
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def status(self) -> LinkStatus:
        """The state, its reason, and the counters."""
        with self._lock:
            c = self._counters
            return LinkStatus(
                state=self._state,
                reason=self._reason,
                since=self._since,
                connects=c.connects,
                session_present=self._session_present,
                inflight=self._sender.inflight,
                rejected=self._sender.rejected,
                inbound_dropped=c.inbound_dropped,
                oversize=c.oversize,
                handler_errors=self._handlers.errors,
            )

    def wait_for(self, *states: LinkState, timeout: float) -> bool:
        """Block until the link is in one of `states`; False on timeout."""
        with self._state_changed:
            return self._state_changed.wait_for(lambda: self._state in states, timeout)

    def stop(self, timeout: float | None = None) -> list[str]:
        """Flush the outbox (up to flush_timeout_s), publish offline, disconnect, join.

        Returns the names of the threads that did not stop within `timeout` (default:
        flush_timeout_s + 3 s), and logs them. Idempotent.
        """
        budget = self._mqtt.flush_timeout_s + 3.0 if timeout is None else timeout
        end = time.monotonic() + budget
        with self._lock:
            if self._deadline is None:
                self._deadline = time.monotonic() + max(
                    0.0, min(self._mqtt.flush_timeout_s, budget - 2 * _OFFLINE_S)
                )
        self._stop.set()
        self._sender.wake()
        stuck = []
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
            if thread.is_alive():
                stuck.append(thread.name)
        if stuck:
            log.warning("MQTT link: threads still running after %.1f s: %s", budget, stuck)
        else:
            _release_sockets(self._client)
        self._set_state(LinkState.STOPPED, "stopped")
        return stuck

    # --- paho client and its callbacks (network thread: hand over, never raise) --------

    @property
    def _address(self) -> str:
        return f"{self._mqtt.host}:{self._mqtt.port}"

    def _make_client(self, client_id: str) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=False,
        )
        client.enable_logger(logging.getLogger(f"{__name__}.paho"))
        client.max_inflight_messages_set(self._mqtt.max_inflight)
        client.connect_timeout = 5.0
        # With its own loop thread and no write hook, paho writes the socket from whichever
        # thread calls publish(). A no-op hook makes it queue the packet and wake loop()
        # instead, so only the network thread ever touches the socket.
        client.on_socket_register_write = _ignore_socket
        client.on_socket_unregister_write = _ignore_socket
        client.on_socket_open = _no_delay
        if self._mqtt.tls is not None:
            client.tls_set_context(_tls_context(self._mqtt))
        client.will_set(
            self.status_topic, self._status_payload("offline", clean=False), qos=1, retain=True
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _on_connect(
        self, _c: paho.Client, _u: Any, flags: Any, reason: ReasonCode, props: Properties | None
    ) -> None:
        with contextlib.suppress(Exception):
            self._events.put(
                _Connack(
                    code=int(reason.value),
                    reason=str(reason),
                    session_present=bool(getattr(flags, "session_present", False)),
                    receive_maximum=getattr(props, "ReceiveMaximum", None),
                    maximum_packet_size=getattr(props, "MaximumPacketSize", None),
                )
            )

    def _on_disconnect(
        self, _c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Properties | None
    ) -> None:
        with contextlib.suppress(Exception):
            self._events.put(_Lost(str(reason)))

    def _on_subscribe(
        self, _c: paho.Client, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any
    ) -> None:
        with contextlib.suppress(Exception):
            failures = tuple(str(r) for r in reasons if r.is_failure)
            if failures:
                self._events.put(_Suback(mid, failures))

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        counters = self._counters
        try:
            size = len(message.payload)
            if size > self._mqtt.max_inbound_bytes:
                counters.oversize += 1
                self._events.put(_Oversize(message.topic, size))
                return
            inline = self._inline.get(message.topic)
            if inline is not None:  # it alone gets this topic
                inline(inbound_from_paho(message))
                return
            if self._events.qsize() >= _MAX_INBOUND_QUEUED:  # handlers are not keeping up
                counters.inbound_dropped += 1
                return
            self._events.put(_Inbound(inbound_from_paho(message)))
        except Exception:  # a topic that is not UTF-8, say: drop it, never raise into paho
            counters.inbound_dropped += 1

    # --- network thread -----------------------------------------------------------------

    def _run_network(self) -> None:
        attempt = 0
        first = True
        try:
            while not self._stop.is_set():
                try:
                    self._set_credentials()
                    if first:  # connect() stores host, port and properties for reconnect()
                        first = False
                        self._client.connect(
                            self._mqtt.host,
                            self._mqtt.port,
                            keepalive=self._mqtt.keepalive_s,
                            clean_start=False,
                            properties=self._connect_properties(),
                        )
                    else:
                        self._client.reconnect()
                except (OSError, ConfigError) as exc:  # ssl.SSLError is an OSError
                    self._events.put(_Lost(f"cannot connect to {self._address}: {exc}", True))
                except Exception as exc:
                    log.exception("MQTT network: connecting failed unexpectedly")
                    self._events.put(_Lost(f"cannot connect to {self._address}: {exc!r}", True))
                else:
                    try:
                        if self._pump():
                            attempt = 0
                    except Exception:  # a bug must not end the link for good: reconnect
                        log.exception("MQTT network: the network loop failed")
                if self._stop.is_set():
                    break
                delay = reconnect_delay(
                    attempt, self._mqtt.reconnect_min_s, self._mqtt.reconnect_max_s
                )
                attempt = min(attempt + 1, 30)
                self._stop.wait(delay)
        finally:
            self._network_done.set()

    def _set_credentials(self) -> None:
        if self._mqtt.username is not None:  # the password file is read at every attempt
            self._client.username_pw_set(self._mqtt.username, self._mqtt.resolve_password())

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._mqtt.session_expiry_s
        props.MaximumPacketSize = self._mqtt.max_inbound_bytes + _PACKET_OVERHEAD
        return props

    def _pump(self) -> bool:
        """Run one connection until it drops or stop; True if the broker accepted it."""
        accepted = False
        while True:
            rc = self._client.loop(timeout=_TICK_S)
            accepted = accepted or self._client.is_connected()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return accepted
            if self._stop.is_set():
                self._close_connection()
                return accepted

    def _close_connection(self) -> None:
        """On stop: let the sender flush, publish offline, send DISCONNECT (all bounded)."""
        deadline = self._shutdown_deadline()
        client = self._client
        while not self._sender.done.is_set() and time.monotonic() < deadline:
            if client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
        if client.is_connected():
            info = client.publish(
                self.status_topic, self._status_payload("offline", clean=True), 1, True
            )
            until = max(deadline, time.monotonic()) + _OFFLINE_S
            while not info.is_published() and time.monotonic() < until:
                if client.loop(timeout=0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return
        client.disconnect()
        until = time.monotonic() + _OFFLINE_S
        while client.socket() is not None and time.monotonic() < until:
            client.loop(timeout=0.05)  # writes DISCONNECT, then paho closes the socket

    def _send_window(self) -> SendWindow:
        """For the sender: connected?, how many unacked (ours and the broker's Receive
        Maximum), and the broker's Maximum Packet Size."""
        with self._lock:
            return SendWindow(
                connected=self._state is LinkState.CONNECTED,
                limit=min(self._mqtt.max_inflight, self._receive_maximum or 65535),
                max_packet=self._maximum_packet_size,
            )

    def _shutdown_deadline(self) -> float:
        """When flushing must end; set by stop(), or now + flush_timeout_s if stopped outside."""
        with self._lock:
            if self._deadline is None:
                self._deadline = time.monotonic() + self._mqtt.flush_timeout_s
            return self._deadline

    # --- worker thread ------------------------------------------------------------------

    def _run_worker(self) -> None:
        while not (self._stop.is_set() and self._network_done.is_set()):
            try:
                event = self._events.get(timeout=_TICK_S)
            except queue.Empty:
                continue
            try:
                self._handle_event(event)
            except Exception:
                log.exception("MQTT worker: handling %r failed", event)

    def _handle_event(self, event: object) -> None:
        if isinstance(event, _Inbound):
            self._handlers.dispatch(event.message)
        elif isinstance(event, _Connack):
            self._handle_connack(event)
        elif isinstance(event, _Lost):
            with self._lock:
                refused = self._state is LinkState.REFUSED
                self._subscriptions_live = False
            if event.unreachable or not refused:  # a refusal keeps the CONNACK's reason
                if event.reason != self.status().reason:  # once per cause, not per retry
                    level = logging.INFO if self._stop.is_set() else logging.WARNING
                    log.log(level, "MQTT link down: %s", event.reason)
                self._set_state(LinkState.DISCONNECTED, event.reason)
            self._sender.wake()
        elif isinstance(event, _Oversize):
            log.warning(
                "dropped a %d-byte message on %s: above mqtt.max_inbound_bytes %d",
                event.size,
                event.topic,
                self._mqtt.max_inbound_bytes,
            )
        elif isinstance(event, _Suback):
            log.error("broker refused subscription (mid %d): %s", event.mid, event.failures)

    def _handle_connack(self, event: _Connack) -> None:
        if event.code >= 0x80:
            message = f"broker refused the connection: {event.reason} (0x{event.code:02x})"
            with self._lock:
                repeated = self._reason == message
            if not repeated:
                log.error("MQTT %s: %s", self._address, message)
            self._set_state(LinkState.REFUSED, message)
            return
        with self._lock:
            self._session_present = event.session_present
            self._receive_maximum = event.receive_maximum
            self._maximum_packet_size = event.maximum_packet_size
            self._counters.connects += 1
            subscriptions = [(f, SubscribeOptions(qos=q)) for f, q in self._handlers.filters()]
            self._subscriptions_live = True
        if subscriptions:  # on every connect: the broker may have lost the session
            self._client.subscribe(subscriptions)
        self._client.publish(self.status_topic, self._status_payload("online"), 1, True)
        log.info(
            "MQTT connected to %s (session %s)",
            self._address,
            "resumed" if event.session_present else "new",
        )
        self._set_state(LinkState.CONNECTED, "")
        self._sender.wake()

    # --- helpers ------------------------------------------------------------------------

    def _set_state(self, state: LinkState, reason: str) -> None:
        with self._state_changed:
            if self._state is LinkState.STOPPED:
                return
            if state is not self._state or reason != self._reason:
                self._since = time.time()
            self._state, self._reason = state, reason
            self._state_changed.notify_all()

    def _status_payload(self, status: str, *, clean: bool | None = None) -> bytes:
        body: dict[str, Any] = {
            "status": status,
            "version": self._version,
            "boot_time": _iso(_boot_time()),
            "started_at": _iso(self._started_at),
        }
        if clean is not None:
            body["clean"] = clean  # False: the broker published the will for us
        return json.dumps(body, separators=(",", ":")).encode()


def reconnect_delay(
    attempt: int, min_s: float, max_s: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds before reconnect attempt `attempt` (0 first): min_s doubled per failure up
    to max_s, then jittered to between half and all of it, so a fleet does not reconnect
    in lockstep after a broker restart."""
    base = min(max_s, min_s * 2 ** min(attempt, 30))
    return base / 2 + rand() * base / 2


class ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when the handshake fails: paho drops the socket without closing it."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def _tls_context(mqtt: MqttConfig) -> ssl.SSLContext:
    """TLS 1.2+, the broker's certificate checked against ca_file (or the system store)."""
    tls = mqtt.tls
    assert tls is not None
    try:
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.cert_file is not None:
            key = str(tls.key_file) if tls.key_file else None
            context.load_cert_chain(str(tls.cert_file), key)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise LinkError(f"MQTT TLS files (mqtt.tls) cannot be used: {exc}") from exc
    context.sslsocket_class = ClosingSSLSocket
    return context


def _ignore_socket(_client: paho.Client, _userdata: Any, _sock: Any) -> None:
    """The external-loop write hook: loop() in the network thread does the writing."""


def _no_delay(_client: paho.Client, _userdata: Any, sock: Any) -> None:
    """TCP_NODELAY: small requests (OTA chunk requests, replies) go out at once instead of
    waiting for the peer's delayed ACK (~40 ms per round trip)."""
    with contextlib.suppress(OSError, AttributeError, ValueError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _release_sockets(client: paho.Client) -> None:
    """Close paho's socket and its wake-up socket pair (paho only does it in __del__)."""
    with contextlib.suppress(Exception):
        client._reset_sockets()


def _agent_version() -> str:
    try:
        return metadata.version("edge-agent")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _boot_time() -> float | None:
    """The device's boot time from /proc/stat (None off Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            for line in stat:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")

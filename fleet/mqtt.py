"""The controller's MQTT 5 connection: broker options for every `edge-fleet` command, and a
small blocking client (connect, subscribe with handlers on a worker thread, publish with
acknowledgement, request/reply by correlation data).

Errors are `FleetLinkError` (an `EdgeAgentError`), with the broker URL and the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import queue
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from runtimes.errors import EdgeAgentError

log = logging.getLogger(__name__)

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
BROKER_ENV = "EDGE_FLEET_BROKER"


class FleetLinkError(EdgeAgentError):
    """The controller could not reach the broker, was refused, or got no answer in time."""


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how the controller proves who it is."""

    host: str
    port: int
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @classmethod
    def parse(cls, url: str, **kwargs: object) -> BrokerSettings:
        """`mqtt://host[:1883]` or `mqtts://host[:8883]`; a bare `host[:port]` is plain MQTT."""
        if "://" not in url:
            url = "mqtt://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise FleetLinkError(
                f"broker {url!r}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
            )
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise FleetLinkError(f"broker {url!r}: bad port ({exc})") from None
        return cls(host=parts.hostname, port=port, tls=tls, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BrokerSettings:
        password = None
        if args.password_env:
            password = os.environ.get(args.password_env)
            if password is None:
                raise FleetLinkError(f"--password-env {args.password_env}: variable is not set")
        settings = cls.parse(
            args.broker,
            ca_file=args.ca,
            cert_file=args.cert,
            key_file=args.key,
            username=args.username,
            password=password,
        )
        if (settings.cert_file is None) != (settings.key_file is None):
            raise FleetLinkError("--cert and --key go together")
        if settings.ca_file is not None or settings.cert_file is not None:
            settings = BrokerSettings(**{**settings.__dict__, "tls": True})
        return settings


def add_broker_args(parser: argparse.ArgumentParser) -> None:
    """The options every command that talks to devices takes."""
    g = parser.add_argument_group("broker")
    g.add_argument(
        "--broker",
        default=os.environ.get(BROKER_ENV, DEFAULT_BROKER),
        help=f"mqtt://HOST:PORT or mqtts://HOST:PORT (env {BROKER_ENV}; default {DEFAULT_BROKER})",
    )
    g.add_argument("--ca", type=Path, help="CA certificate that signed the broker's (implies TLS)")
    g.add_argument("--cert", type=Path, help="controller client certificate (PEM)")
    g.add_argument("--key", type=Path, help="controller client key (PEM)")
    g.add_argument("--username", help="broker user name")
    g.add_argument("--password-env", metavar="VAR", help="environment variable with the password")


@dataclass(frozen=True)
class Message:
    """One received message, with the MQTT 5 properties the wire contract uses."""

    topic: str
    payload: bytes
    retain: bool = False
    correlation_data: bytes | None = None
    response_topic: str | None = None
    user_properties: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Message], None]


def _no_delay(_c: object, _u: object, sock: object) -> None:
    """TCP_NODELAY on every (re)connected socket: requests and chunk replies are small, and
    without it each round trip can wait ~40 ms for a delayed ACK."""
    with contextlib.suppress(OSError, AttributeError, ValueError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]


def _to_message(msg: paho.MQTTMessage) -> Message:
    props = getattr(msg, "properties", None)
    corr = getattr(props, "CorrelationData", None) if props is not None else None
    resp = getattr(props, "ResponseTopic", None) if props is not None else None
    users = getattr(props, "UserProperty", None) if props is not None else None
    return Message(
        topic=msg.topic,
        payload=bytes(msg.payload),
        retain=bool(msg.retain),
        correlation_data=bytes(corr) if corr is not None else None,
        response_topic=resp,
        user_properties=dict(users or []),
    )


class FleetClient:
    """A blocking MQTT 5 client for the controller.

    paho's network thread only queues what arrives; one `fleet-mqtt-worker` thread calls the
    handlers in arrival order (a handler that raises is logged, never fatal). Subscriptions
    are renewed on every reconnect.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        client_id: str | None = None,
        *,
        max_inflight: int = 64,
    ) -> None:
        self.settings = settings
        self.client_id = client_id or f"edge-fleet-{uuid.uuid4().hex[:10]}"
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self._client.max_inflight_messages_set(max_inflight)
        self._client.max_queued_messages_set(0)
        if settings.tls:
            ctx = ssl.create_default_context(
                cafile=str(settings.ca_file) if settings.ca_file else None
            )
            if settings.cert_file and settings.key_file:
                ctx.load_cert_chain(str(settings.cert_file), str(settings.key_file))
            self._client.tls_set_context(ctx)
        if settings.username:
            self._client.username_pw_set(settings.username, settings.password)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_socket_open = _no_delay
        self._lock = threading.Lock()
        self._connack = threading.Event()
        self._connack_reason = ""
        self._connected = False
        self._subs: dict[str, tuple[int, list[Handler]]] = {}
        self._subacks: dict[int, threading.Event] = {}
        self._suback_failures: dict[int, str] = {}
        self._inbox: queue.Queue[Message | None] = queue.Queue()
        self._pending: dict[bytes, tuple[threading.Event, list[Message]]] = {}
        self._reply_topics: set[str] = set()
        self._worker = threading.Thread(target=self._work, name="fleet-mqtt-worker", daemon=True)
        self._closed = False

    # --- paho callbacks: network thread, hand over only ---------------------------------

    def _on_connect(self, _c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        failed = getattr(reason, "is_failure", False)
        with self._lock:
            self._connected = not failed
            self._connack_reason = str(reason)
            subs = [(t, q) for t, (q, _h) in self._subs.items()] if not failed else []
        for topic, qos in subs:  # a clean session forgets them: renew every time
            self._client.subscribe(topic, options=SubscribeOptions(qos=qos))
        self._connack.set()

    def _on_disconnect(
        self, _c: object, _u: object, _f: object, reason: object, _p: object
    ) -> None:
        with self._lock:
            self._connected = False
            if not self._connack.is_set():
                self._connack_reason = str(reason)
        if not self._closed:
            log.warning("broker %s: connection lost (%s)", self.settings.url, reason)

    def _on_subscribe(self, _c: object, _u: object, mid: int, codes: list, _p: object) -> None:
        with self._lock:
            bad = [str(c) for c in codes if getattr(c, "is_failure", False)]
            if bad:
                self._suback_failures[mid] = ", ".join(bad)
            event = self._subacks.pop(mid, None)
        if event is not None:
            event.set()

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        self._inbox.put(_to_message(msg))

    # --- the worker ----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            msg = self._inbox.get()
            if msg is None:
                return
            if msg.correlation_data is not None and msg.topic in self._reply_topics:
                with self._lock:
                    waiter = self._pending.get(msg.correlation_data)
                if waiter is not None:
                    waiter[1].append(msg)
                    waiter[0].set()
                    continue
            with self._lock:
                handlers = [
                    h
                    for t, (_q, hs) in self._subs.items()
                    if paho.topic_matches_sub(t, msg.topic)
                    for h in hs
                ]
            for handler in handlers:
                try:
                    handler(msg)
                except Exception:
                    log.exception("handler for %s failed", msg.topic)

    # --- API ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._connected

    def connect(self, timeout: float = 10.0) -> FleetClient:
        """Connect and wait for the CONNACK; a refusal or no answer is a FleetLinkError."""
        url = self.settings.url
        self._worker.start()
        try:
            self._client.connect_async(self.settings.host, self.settings.port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise FleetLinkError(f"broker {url}: {exc}") from None
        self._client._reset_sockets(sockpair_only=True)  # loop_start makes its own pair
        self._client.loop_start()
        if not self._connack.wait(timeout):
            self.close()
            raise FleetLinkError(f"broker {url}: no answer within {timeout:g} s")
        if not self.connected:
            reason = self._connack_reason
            self.close()
            raise FleetLinkError(f"broker {url} refused the connection: {reason}")
        return self

    def subscribe(
        self, topic_filter: str, handler: Handler, qos: int = 1, timeout: float = 10.0
    ) -> None:
        """Call `handler(message)` for every message on `topic_filter`; waits for the SUBACK."""
        with self._lock:
            entry = self._subs.get(topic_filter)
            if entry is not None:
                entry[1].append(handler)
                return
            self._subs[topic_filter] = (qos, [handler])
        self._subscribe_now(topic_filter, qos, timeout)

    def _subscribe_now(self, topic_filter: str, qos: int, timeout: float) -> None:
        event = threading.Event()
        with self._lock:  # hold the lock so the SUBACK cannot beat the registration
            rc, mid = self._client.subscribe(topic_filter, options=SubscribeOptions(qos=qos))
            if rc == paho.MQTT_ERR_SUCCESS and mid is not None:
                self._subacks[mid] = event
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise FleetLinkError(f"subscribe {topic_filter}: {paho.error_string(rc)}")
        if not event.wait(timeout):
            raise FleetLinkError(f"subscribe {topic_filter}: no SUBACK within {timeout:g} s")
        with self._lock:
            failure = self._suback_failures.pop(mid, None)
        if failure:
            raise FleetLinkError(f"subscribe {topic_filter}: refused by the broker ({failure})")

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
        user_properties: dict[str, str] | None = None,
        wait: bool = True,
        timeout: float = 10.0,
    ) -> paho.MQTTMessageInfo:
        """Publish; with `wait`, block until the broker acknowledged it (PUBACK for QoS 1)."""
        props = None
        if correlation_data is not None or response_topic or user_properties:
            props = Properties(PacketTypes.PUBLISH)
            if correlation_data is not None:
                props.CorrelationData = correlation_data
            if response_topic:
                props.ResponseTopic = response_topic
            if user_properties:
                props.UserProperty = list(user_properties.items())
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc != paho.MQTT_ERR_SUCCESS and info.rc != paho.MQTT_ERR_NO_CONN:
            raise FleetLinkError(f"publish {topic}: {paho.error_string(info.rc)}")
        if wait:
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                raise FleetLinkError(f"publish {topic}: {exc}") from None
            if not info.is_published():
                raise FleetLinkError(f"publish {topic}: not acknowledged within {timeout:g} s")
        return info

    def request(
        self,
        topic: str,
        payload: bytes | str,
        response_topic: str,
        *,
        timeout: float = 10.0,
        until: Callable[[Message], bool] | None = None,
        on_message: Handler | None = None,
    ) -> list[Message]:
        """Publish with a fresh correlation id and collect the replies on `response_topic`.

        Returns after the first reply, or, with `until`, after the reply for which it is
        true (streams: progress messages, then a final one). `on_message` sees each reply as
        it arrives. No final reply within `timeout` seconds of the last one is an error.
        """
        self.ensure_reply_topic(response_topic)
        corr = uuid.uuid4().bytes
        event = threading.Event()
        got: list[Message] = []
        with self._lock:
            self._pending[corr] = (event, got)
        try:
            self.publish(topic, payload, correlation_data=corr, response_topic=response_topic)
            seen = 0
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not event.wait(left):
                    raise FleetLinkError(f"{topic}: no reply within {timeout:g} s")
                event.clear()
                while seen < len(got):
                    msg = got[seen]
                    seen += 1
                    if on_message is not None:
                        on_message(msg)
                    if until is None or until(msg):
                        return got[:seen]
                deadline = time.monotonic() + timeout
        finally:
            with self._lock:
                self._pending.pop(corr, None)

    def ensure_reply_topic(self, response_topic: str) -> None:
        """Subscribe to a response topic once (replies are matched by correlation data)."""
        with self._lock:
            known = response_topic in self._reply_topics
            self._reply_topics.add(response_topic)
            if not known:
                self._subs.setdefault(response_topic, (1, []))
        if not known:
            self._subscribe_now(response_topic, 1, 10.0)

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly and stop both threads."""
        if self._closed:
            return
        self._closed = True
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
            with contextlib.suppress(Exception):  # paho closes these only in __del__
                self._client._reset_sockets()
            self._inbox.put(None)
            if self._worker.is_alive():
                self._worker.join(timeout)

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def connect(args: argparse.Namespace, client_id: str | None = None) -> FleetClient:
    """A connected client from the `add_broker_args` options."""
    return FleetClient(BrokerSettings.from_args(args), client_id).connect()

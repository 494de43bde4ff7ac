"""One MQTT 5 request/response over mutual TLS, on the calling thread: connect with a client
certificate, subscribe to the reply topic, publish with response topic + correlation data,
wait for the answer. Used by `edge-agent provision` (claim identity) and `renew` (device's).

Every failure is an `EnrolLinkError` that says what to check, or `EnrolRefused` with the
controller's reason.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.mqtt_link import ClosingSSLSocket
from provisioning.identity import EnrolLinkError, EnrolRefused


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """`mqtts://host[:8883]` or `host[:port]`; enrolment always uses TLS."""
        text = url if "://" in url else "mqtts://" + url
        parts = urlsplit(text)
        if parts.scheme != "mqtts" or not parts.hostname:
            raise EnrolLinkError(
                f"broker {url!r}: expected mqtts://HOST[:PORT] (enrolment needs TLS)"
            )
        try:
            port = parts.port or 8883
        except ValueError as exc:
            raise EnrolLinkError(f"broker {url!r}: bad port ({exc})") from None
        return cls(parts.hostname, port)


def tls_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise EnrolLinkError(f"CA file {ca} cannot be used: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise EnrolLinkError(
            f"client certificate {cert} / key {key} cannot be used: {exc}"
        ) from None
    context.sslsocket_class = ClosingSSLSocket
    return context


def _explain_tls(exc: BaseException, broker: BrokerAddress, ca: Path) -> str:
    text = str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"broker {broker.url}: its certificate is not trusted with CA file {ca} "
            f"({exc.verify_message or text}); is --ca the fleet CA?"
        )
    if "alert" in text.lower() or isinstance(exc, ssl.SSLError):
        return (
            f"broker {broker.url} refused our client certificate ({text}): it may be expired, "
            "revoked or from another CA"
        )
    return f"broker {broker.url} cannot be reached: {exc}"


class RequestClient:
    """Connect, ask once, disconnect. Not thread-safe; one request per instance."""

    def __init__(
        self,
        broker: BrokerAddress,
        *,
        ca: Path,
        cert: Path,
        key: Path,
        client_id: str,
        timeout: float = 30.0,
    ) -> None:
        self.broker = broker
        self.ca = ca
        self.timeout = timeout
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        self._client.tls_set_context(tls_context(ca, cert, key))
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._connack: Any = None
        self._suback: list[Any] | None = None
        self._replies: list[paho.MQTTMessage] = []

    def _on_connect(self, _c: object, _u: object, _f: object, reason: Any, _p: object) -> None:
        self._connack = reason

    def _on_subscribe(self, _c: object, _u: object, _mid: int, codes: Any, _p: object) -> None:
        self._suback = list(codes)

    def _on_message(self, _c: object, _u: object, msg: paho.MQTTMessage) -> None:
        self._replies.append(msg)

    def _loop_until(self, done: Any, what: str, deadline: float) -> None:
        while not done():
            if time.monotonic() >= deadline:
                raise EnrolLinkError(
                    f"broker {self.broker.url}: no {what} within {self.timeout:g} s"
                    + (
                        "; is the enrolment service (edge-fleet enrol-serve) running?"
                        if what == "reply"
                        else ""
                    )
                )
            try:
                rc = self._client.loop(0.1)
            except (ssl.SSLError, OSError) as exc:
                raise EnrolLinkError(_explain_tls(exc, self.broker, self.ca)) from None
            if rc != paho.MQTT_ERR_SUCCESS:
                raise EnrolLinkError(
                    f"broker {self.broker.url} closed the connection before the {what} "
                    f"({paho.error_string(rc)}): our certificate may be expired, revoked or "
                    "not allowed on these topics"
                )

    def request(self, topic: str, reply_topic: str, body: dict[str, Any]) -> dict[str, Any]:
        """Publish `body` to `topic` and return the JSON reply from `reply_topic`."""
        deadline = time.monotonic() + self.timeout
        try:
            try:
                self._client.connect(self.broker.host, self.broker.port, keepalive=30)
            except (ssl.SSLError, OSError) as exc:
                raise EnrolLinkError(_explain_tls(exc, self.broker, self.ca)) from None
            self._loop_until(lambda: self._connack is not None, "CONNACK", deadline)
            if self._connack.is_failure:
                raise EnrolLinkError(
                    f"broker {self.broker.url} refused the connection: {self._connack}"
                )
            self._client.subscribe(reply_topic, qos=1)
            self._loop_until(lambda: self._suback is not None, "SUBACK", deadline)
            assert self._suback is not None
            if any(getattr(code, "is_failure", False) for code in self._suback):
                raise EnrolLinkError(f"broker refused the subscription to {reply_topic}")
            corr = uuid.uuid4().bytes
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = reply_topic
            props.CorrelationData = corr
            self._client.publish(topic, json.dumps(body), qos=1, properties=props)

            def answered() -> bool:
                return any(
                    getattr(m.properties, "CorrelationData", None) == corr for m in self._replies
                )

            self._loop_until(answered, "reply", deadline)
            msg = next(
                m for m in self._replies if getattr(m.properties, "CorrelationData", None) == corr
            )
        finally:
            self.close()
        try:
            reply = json.loads(msg.payload)
        except (ValueError, UnicodeDecodeError):
            raise EnrolLinkError(f"the reply on {reply_topic} is not JSON") from None
        if not isinstance(reply, dict):
            raise EnrolLinkError(f"the reply on {reply_topic} is not a JSON object")
        if not reply.get("ok"):
            raise EnrolRefused(str(reply.get("error", "refused")), str(reply.get("message", "")))
        return reply

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._client.is_connected():
                self._client.disconnect()
                self._client.loop(0.1)
        self._client._reset_sockets()  # paho closes its wake-up socket pair only in __del__

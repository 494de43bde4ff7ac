"""What arrives from the broker: `InboundMessage`, and the table of topic filters to handlers.

Dispatch runs every matching handler and contains its failures: one bad handler or payload
never stops the others.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho

from agent.errors import PayloadError

__all__ = ["Handler", "HandlerTable", "InboundMessage", "inbound_from_paho"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InboundMessage:
    """A message from the broker, as handlers receive it (MQTT 5 request/response included)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()

    def json(self) -> Any:
        """The payload parsed as JSON; PayloadError (with the topic) if it is not."""
        try:
            return json.loads(self.payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PayloadError(f"{self.topic}: payload is not JSON: {exc}") from None


Handler = Callable[[InboundMessage], None]


def inbound_from_paho(message: paho.MQTTMessage) -> InboundMessage:
    """Copy what handlers need out of paho's message (cheap: no parsing)."""
    props = getattr(message, "properties", None)
    return InboundMessage(
        topic=message.topic,  # raises UnicodeDecodeError for a topic that is not UTF-8
        payload=bytes(message.payload),
        qos=message.qos,
        retain=bool(message.retain),
        response_topic=getattr(props, "ResponseTopic", None),
        correlation_data=getattr(props, "CorrelationData", None),
        user_properties=tuple(getattr(props, "UserProperty", None) or ()),
    )


class HandlerTable:
    """Topic filter -> (QoS, handlers); thread-safe; `$share/<group>/` filters match too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._table: dict[str, tuple[int, list[Handler]]] = {}
        self.errors = 0  # handler calls that raised

    def add(self, topic_filter: str, handler: Handler, qos: int) -> None:
        if not topic_filter or qos not in (0, 1, 2):
            raise ValueError(f"bad subscription {topic_filter!r} qos {qos}")
        with self._lock:
            old_qos, handlers = self._table.get(topic_filter, (0, []))
            self._table[topic_filter] = (max(old_qos, qos), [*handlers, handler])

    def filters(self) -> list[tuple[str, int]]:
        """Every filter with the highest QoS asked for it (what to SUBSCRIBE)."""
        with self._lock:
            return [(f, qos) for f, (qos, _) in self._table.items()]

    def dispatch(self, message: InboundMessage) -> None:
        """Call each matching handler; an exception is logged and counted, never raised."""
        with self._lock:
            handlers = [
                h
                for f, (_, hs) in self._table.items()
                if paho.topic_matches_sub(_strip_share(f), message.topic)
                for h in hs
            ]
        if not handlers:
            log.debug("no handler for %s", message.topic)
        for handler in handlers:
            try:
                handler(message)
            except Exception:
                self.errors += 1
                log.exception("handler %s failed on %s", _name(handler), message.topic)


def _strip_share(topic_filter: str) -> str:
    """`$share/<group>/a/b` matches like `a/b`."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else topic_filter
    return topic_filter


def _name(handler: Handler) -> str:
    return getattr(handler, "__qualname__", None) or repr(handler)

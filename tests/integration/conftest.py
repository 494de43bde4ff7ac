"""Fixtures for the integration tests: a real mosquitto per test, and links to it.

No broker, no test: a missing mosquitto fails the fixture with an install hint.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.mqtt_link import MqttLink
from agent.outbox import Outbox
from tests.mqtt_broker import Broker, BrokerMissing, Observer, mqtt_config


def _broker(tmp_path: Path, **kwargs: Any) -> Iterator[Broker]:
    try:
        broker = Broker(tmp_path / "broker", **kwargs)
    except BrokerMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """Anonymous mosquitto on a free loopback port, with persistence."""
    yield from _broker(tmp_path)


@pytest.fixture
def auth_broker(tmp_path: Path) -> Iterator[Broker]:
    """mosquitto that wants a user name and password (dev-1 / s3cret, fleet / fleet)."""
    yield from _broker(tmp_path, users={"dev-1": "s3cret", "fleet": "fleet"})


LinkFactory = Callable[..., tuple[MqttLink, Outbox]]


@pytest.fixture
def make_link(tmp_path: Path) -> Iterator[LinkFactory]:
    """make_link(broker, device_id="dev-1", db=..., **mqtt) -> (started link, its outbox).

    Everything made is stopped and closed at the end of the test.
    """
    made: list[tuple[MqttLink, Outbox]] = []

    def make(
        broker: Broker,
        device_id: str = "dev-1",
        *,
        db: Path | None = None,
        start: bool = True,
        stop_event: threading.Event | None = None,
        outbox_kwargs: dict[str, Any] | None = None,
        **mqtt: Any,
    ) -> tuple[MqttLink, Outbox]:
        outbox = Outbox(db or tmp_path / f"outbox-{len(made)}.db", **(outbox_kwargs or {}))
        link = MqttLink(device_id, mqtt_config(broker, **mqtt), outbox, stop_event=stop_event)
        made.append((link, outbox))
        if start:
            link.start()
        return link, outbox

    yield make
    for link, outbox in made:
        assert link.stop(timeout=5) == [], "link threads did not stop"
        outbox.close()


@pytest.fixture
def observers() -> Iterator[Callable[..., Observer]]:
    """observers(broker, [topics], **kwargs) -> a connected, subscribed paho client."""
    made: list[Observer] = []

    def make(broker: Broker, topics: list[str], **kwargs: Any) -> Observer:
        observer = Observer(broker, topics, **kwargs)
        made.append(observer)
        return observer

    yield make
    for observer in made:
        observer.close()

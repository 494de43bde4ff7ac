"""The [serial] extension without threads: which values are attached (fresh ones, by kind),
what the sink is given, and the factory's None without a [serial] section."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.config import AgentConfig, SerialConfig
from agent.serial_ext import SerialExtension, create
from agent.serial_lines import with_checksum

GGA = with_checksum("GPGGA,123519.00,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,")


def extension(**serial: Any) -> SerialExtension:
    config = SerialConfig.model_validate(
        {
            "sink": {"port": "/dev/null-sink"},
            "sources": [
                {"name": "gps", "port": "/dev/null-gps", "kinds": ["nmea"]},
                {"name": "env", "port": "/dev/null-env", "kinds": ["kv"]},
            ],
            **serial,
        }
    )
    return SerialExtension(config)


def feed(ext: SerialExtension, source: str, line: str) -> None:
    ext.sources[source][1]._handle(line)  # what the source thread does with each line


def test_fresh_values_by_kind_are_attached_and_the_sink_gets_the_event() -> None:
    ext = extension()
    feed(ext, "gps", GGA)
    feed(ext, "gps", "temp=99")  # a kv line on the nmea-only port: not taken
    feed(ext, "env", "temp=21.5 door=open")
    feed(ext, "env", GGA)  # a fix on the kv-only port: not taken
    event: dict[str, Any] = {"pipeline": "door", "snapshot_jpeg_b64": "AAAA"}
    ext.on_event("door", event)
    assert event["gps"]["lat"] == pytest.approx(48 + 7.038 / 60)
    assert event["sensors"] == {"temp": 21.5, "door": "open"}
    assert ext.sink is not None and ext.sink.stats()["queue"] == 1
    sent = ext.sink._queue[0]
    assert "snapshot_jpeg_b64" not in sent and sent["gps"] == event["gps"]


def test_stale_values_are_left_out() -> None:
    ext = extension(max_age_s=2.0)
    feed(ext, "gps", GGA)
    feed(ext, "env", "temp=21.5")
    assert set(ext.latest()) == {"gps", "sensors"}
    assert ext.latest(now=time.time() + 5) == {}


def test_attach_false_sends_the_event_untouched() -> None:
    ext = extension(attach=False)
    feed(ext, "gps", GGA)
    event: dict[str, Any] = {"pipeline": "door"}
    ext.on_event("door", event)
    assert event == {"pipeline": "door"}


def test_factory_is_none_without_the_section_and_registers_a_hook_with_it(tmp_path: Path) -> None:
    base = {"device": {"id": "cam-1", "state_dir": str(tmp_path)}, "mqtt": {"host": "b"}}
    agent = SimpleNamespace(
        config=AgentConfig.model_validate(base), stop_event=None, event_hooks=[]
    )
    assert create(agent) is None  # type: ignore[arg-type]
    agent.config = AgentConfig.model_validate({**base, "serial": {"sources": []}})
    ext = create(agent)  # type: ignore[arg-type]
    assert isinstance(ext, SerialExtension) and agent.event_hooks == [ext.on_event]


def test_a_port_is_used_once() -> None:
    with pytest.raises(ValueError, match="already used by sink"):
        SerialConfig.model_validate(
            {"sink": {"port": "/dev/ttyS0"}, "sources": [{"name": "g", "port": "/dev/ttyS0"}]}
        )

"""The `[serial]` extension of a running agent: starts the serial sink and sources, sends
every detection event to the sink, and attaches the newest GPS fix and sensor readings to
events and telemetry. Factory `create(agent)`; None when the config has no [serial].
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from agent.config import SerialConfig, SerialSinkSection, SerialSourceSection
from agent.serial_io import SerialSink, SerialSinkConfig, SerialSource, SerialSourceConfig

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger(__name__)

# What the sink does not get: the JPEG snapshot would not fit a UART line.
SINK_SKIP = frozenset({"snapshot_jpeg_b64"})


def create(agent: Agent) -> SerialExtension | None:
    section = agent.config.serial
    if section is None:
        return None
    ext = SerialExtension(section, agent.stop_event)
    agent.event_hooks.append(ext.on_event)
    return ext


def sink_config(section: SerialSinkSection) -> SerialSinkConfig:
    return SerialSinkConfig(**section.model_dump())


def source_config(section: SerialSourceSection) -> SerialSourceConfig:
    return SerialSourceConfig(**section.model_dump(exclude={"name", "kinds"}))


class SerialExtension:
    """One sink (optional) and any number of sources, each on its own thread."""

    name = "serial"

    def __init__(self, config: SerialConfig, stop_event: Any = None) -> None:
        self.config = config
        self.sink = SerialSink(sink_config(config.sink), stop_event) if config.sink else None
        self.sources: dict[str, tuple[SerialSourceSection, SerialSource]] = {
            s.name: (s, SerialSource(source_config(s), stop_event)) for s in config.sources
        }

    def start(self) -> None:
        if self.sink is not None:
            self.sink.start()
        for _section, source in self.sources.values():
            source.start()

    def stop(self, timeout: float) -> bool:
        stuck: list[str] = []
        for _section, source in self.sources.values():
            stuck += source.stop(timeout)
        if self.sink is not None:
            stuck += self.sink.stop(timeout)
        return not stuck

    # --- events (pipeline threads) ------------------------------------------------------

    def on_event(self, _pipeline: str, event: dict[str, Any]) -> None:
        """Attach fresh sensor values to `event` (in place), then queue it for the sink."""
        if self.config.attach:
            event.update(self.latest())
        if self.sink is not None:
            self.sink.send({k: v for k, v in event.items() if k not in SINK_SKIP})

    def latest(self, now: float | None = None) -> dict[str, Any]:
        """{"gps": {...}} from the freshest NMEA fix and {"sensors": {key: value}} from the
        key=value sources, each only when newer than max_age_s; {} when nothing is fresh."""
        moment = time.time() if now is None else now
        oldest = moment - self.config.max_age_s
        gps: dict[str, Any] = {}
        sensors: dict[str, Any] = {}
        for section, source in self.sources.values():
            values = source.latest()
            fix = values["gps"]
            if (
                "nmea" in section.kinds
                and fix.get("position_ts", 0) >= oldest
                and fix.get("position_ts", 0) >= gps.get("position_ts", 0)
            ):
                gps = fix
            if "kv" in section.kinds:
                for key, reading in values["sensors"].items():
                    if reading["ts"] >= oldest:
                        sensors[key] = reading["value"]
        out: dict[str, Any] = {}
        if gps:
            out["gps"] = {k: v for k, v in gps.items() if k not in ("ts", "position_ts")}
            out["gps"]["age_s"] = round(moment - gps["position_ts"], 3)
        if sensors:
            out["sensors"] = sensors
        return out

    # --- state --------------------------------------------------------------------------

    def reported(self) -> dict[str, Any]:
        return {
            "sink": self.config.sink.port if self.config.sink else None,
            "sources": {name: section.port for name, (section, _s) in self.sources.items()},
        }

    def telemetry(self) -> dict[str, Any]:
        return {
            "sink": self.sink.stats() if self.sink else None,
            "sources": {name: source.stats() for name, (_sec, source) in self.sources.items()},
            "latest": self.latest(),
        }

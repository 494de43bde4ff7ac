"""The agent daemon (`edge-agent run`): builds the pipelines, MQTT link, outbox and command
router from the config, reports state and telemetry, feeds systemd, and stops cleanly.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from agent import __version__
from agent.camera import CameraStream
from agent.commands import CommandRouter
from agent.config import AgentConfig, PipelineConfig, load_config
from agent.extensions import Extension, load_extensions
from agent.handlers import register_builtin_commands
from agent.mqtt_link import MqttLink
from agent.outbox import Outbox, Priority
from agent.pipeline import DetectionFilter, DetectionPipeline
from agent.sdnotify import Notifier
from agent.telemetry import SystemProbe, system_report
from models.yolox.detector import YoloxDetector
from models.zoo import resolve
from runtimes.base import RuntimeOptions
from runtimes.errors import EdgeAgentError

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 5.0
RESTART_EXIT_CODE = 75  # EX_TEMPFAIL: the unit restarts the agent (RestartForceExitStatus)


def pipeline_filter(cfg: PipelineConfig) -> DetectionFilter:
    zones = tuple(tuple((float(x), float(y)) for x, y in zone) for zone in cfg.zones or [])
    return DetectionFilter(frozenset(cfg.classes) if cfg.classes else None, zones)


def build_detector(
    cfg: PipelineConfig, model: str | Path | None = None
) -> tuple[YoloxDetector, str]:
    """The pipeline's detector and its label `name@version`; `model` (an OTA package)
    replaces cfg.model, and the config's runtime options apply only if its runtime matches."""
    ref = resolve(model if model is not None else cfg.model)
    runtime: str | None = cfg.runtime.type if cfg.runtime else None
    options = cfg.runtime.runtime_options() if cfg.runtime else RuntimeOptions()
    if model is not None and ref.manifest is not None and runtime != ref.manifest.runtime:
        runtime, options = ref.manifest.runtime, RuntimeOptions()
    detector = YoloxDetector.from_ref(
        ref, runtime=runtime, options=options, conf=cfg.conf, nms=cfg.nms
    )
    label = f"{ref.manifest.name}@{ref.manifest.version}" if ref.manifest else ref.path.name
    return detector, label


class Agent:
    """One running agent. `start()`, then `run()` until the stop event; `run()` cleans up."""

    def __init__(
        self,
        config: AgentConfig,
        config_path: Path | None = None,
        notifier: Notifier | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.stop_event = stop or threading.Event()
        self.notifier = notifier or Notifier()
        self.device_id = config.device.id
        self.started = time.time()
        self.exit_code = 0
        self.revision = 0
        self.probe = SystemProbe()
        self.pipelines: dict[str, DetectionPipeline] = {}
        self._hang_reported: set[str] = set()
        self.outbox = Outbox.from_config(config)
        self.link = MqttLink.from_config(config, self.outbox, stop_event=self.stop_event)
        self.commands = CommandRouter(self.device_id, self._reply, self.stop_event)
        register_builtin_commands(self)
        self.metrics: Any = None
        # Extensions may add hooks: (pipeline, event) -> None, called on the pipeline thread
        # before the event is published; a hook may add keys to the event, never block.
        self.event_hooks: list[Callable[[str, dict[str, Any]], None]] = []
        self.extensions: list[Extension] = load_extensions(self)

    # --- wiring -----------------------------------------------------------------------

    def topic(self, suffix: str) -> str:
        return f"edge/{self.device_id}/{suffix}"

    def _emit_event(self, pipeline: str, event: dict[str, Any]) -> None:
        for hook in self.event_hooks:
            try:
                hook(pipeline, event)
            except Exception:  # a broken hook never costs the event
                log.exception("event hook %r failed", hook)
        self.link.publish(
            self.topic(f"events/{pipeline}"), json.dumps(event), qos=1, priority=Priority.EVENT
        )

    def _reply(self, topic: str, body: dict[str, Any], correlation: bytes | None) -> None:
        self.link.publish(
            topic, json.dumps(body), qos=1, priority=Priority.CONTROL, correlation_data=correlation
        )

    def _load_model(self, cfg: PipelineConfig) -> tuple[YoloxDetector, str]:
        """The OTA store's current package (then previous) if one loads, else cfg.model."""
        from agent.ota.store import startup_models

        for package in startup_models(self.config, cfg.name):
            try:
                return build_detector(cfg, package)
            except EdgeAgentError as exc:
                log.error("pipeline %s: OTA package %s does not load: %s", cfg.name, package, exc)
        return build_detector(cfg)

    def _add_pipeline(self, cfg: PipelineConfig) -> DetectionPipeline:
        detector, label = self._load_model(cfg)
        camera = CameraStream(
            cfg.source,
            self.stop_event,
            loop=cfg.loop,
            realtime=cfg.realtime,
            backoff_min_s=cfg.reopen_min_s,
            backoff_max_s=cfg.reopen_max_s,
        )
        pipe = DetectionPipeline(
            cfg.name,
            camera,
            detector,
            self._emit_event,
            self.stop_event,
            model_label=label,
            filters=pipeline_filter(cfg),
            event_mode=cfg.event_mode,
            rate_s=cfg.rate_s,
            snapshot=cfg.snapshot,
            hang_limit_s=cfg.hang_limit_s,
        )
        self.pipelines[cfg.name] = pipe
        return pipe

    def start(self) -> None:
        """Load every model first (a bad one fails the start), then start the threads."""
        for cfg in self.config.pipelines:
            self._add_pipeline(cfg)
        self.link.subscribe(self.topic("cmd/+"), self.commands.on_message)
        self.link.start()
        self.commands.start()
        for pipe in self.pipelines.values():
            pipe.camera.start()
            pipe.start()
        for ext in self.extensions:
            ext.start()
        if self.config.metrics.enabled:
            from agent.prometheus import MetricsServer

            m = self.config.metrics
            self.metrics = MetricsServer(
                m.host, m.port, self.telemetry, allow_remote=m.allow_remote
            )
            self.metrics.start()
        self.publish_reported()
        self.notifier.ready(f"{len(self.pipelines)} pipeline(s)")
        log.info("agent %s started: %d pipeline(s)", self.device_id, len(self.pipelines))

    # --- state ------------------------------------------------------------------------

    def reported(self) -> dict[str, Any]:
        return {
            "agent_version": __version__,
            "config_revision": self.revision,
            "started_at": round(self.started, 3),
            "pipelines": {
                name: {
                    "model": pipe.model_label,
                    "runtime": pipe.detector.runtime.backend,
                    "accelerators": pipe.detector.runtime.accelerators(),
                    "classes": pipe.detector.class_names,
                }
                for name, pipe in self.pipelines.items()
            },
            "capabilities": {"commands": self.commands.names, "tasks": self.tasks()},
            **{ext.name: ext.reported() for ext in self.extensions},
            "ts": round(time.time(), 3),
        }

    def tasks(self) -> list[str]:
        names = {"detection"} | {e.name for e in self.extensions if e.name in ("llm", "diffusion")}
        return sorted(names)

    def publish_reported(self) -> None:
        self.link.publish(
            self.topic("reported"),
            json.dumps(self.reported()),
            qos=1,
            retain=True,
            priority=Priority.CONTROL,
        )

    def telemetry(self) -> dict[str, Any]:
        status = self.link.status()
        outbox = self.outbox.stats()
        return {
            "device": self.device_id,
            "ts": round(time.time(), 3),
            "uptime_s": round(time.time() - self.started, 1),
            "system": system_report(self.probe, self.config.device.state_dir),
            "link": {
                "state": status.state.value,
                "reason": status.reason,
                "connects": status.connects,
                "inflight": status.inflight,
                "rejected": status.rejected,
                "inbound_dropped": status.inbound_dropped,
                "oversize": status.oversize,
                "handler_errors": status.handler_errors,
            },
            "outbox": asdict(outbox),
            "pipelines": {name: pipe.stats() for name, pipe in self.pipelines.items()},
            "commands": {
                "handled": self.commands.handled,
                "failed": self.commands.failed,
                "rejected": self.commands.rejected,
            },
            **{ext.name: ext.telemetry() for ext in self.extensions},
        }

    def healthy(self) -> bool:
        """False while any pipeline is hung: the watchdog is then no longer fed."""
        healthy = True
        for name, pipe in self.pipelines.items():
            if pipe.hung():
                healthy = False
                if name not in self._hang_reported:
                    self._hang_reported.add(name)
                    log.error(
                        "pipeline %s: inference hung for more than %.0f s", name, pipe.hang_limit_s
                    )
                    self.link.publish(
                        self.topic(f"events/{name}"),
                        json.dumps(
                            {
                                "pipeline": name,
                                "alert": "inference_hung",
                                "limit_s": pipe.hang_limit_s,
                                "ts": round(time.time(), 3),
                            }
                        ),
                        priority=Priority.EVENT,
                    )
            else:
                self._hang_reported.discard(name)
        return healthy

    # --- config changes ---------------------------------------------------------------

    def apply_config(self, new: AgentConfig) -> dict[str, Any]:
        """Apply what can change live; say what needs a restart."""
        old = self.config
        live: list[str] = []
        restart: list[str] = []
        if old.device != new.device:
            restart.append("device")
        if old.mqtt != new.mqtt:
            restart.append("mqtt")
        if old.outbox != new.outbox:
            restart.append("outbox")
        if old.metrics != new.metrics:
            restart.append("metrics")
        old_pipes = {p.name: p for p in old.pipelines}
        new_pipes = {p.name: p for p in new.pipelines}
        if set(old_pipes) != set(new_pipes):
            restart.append("pipelines (added or removed)")
        for name, cfg in new_pipes.items():
            before = old_pipes.get(name)
            if before is None or name not in self.pipelines:
                continue
            structural = (
                "source",
                "model",
                "runtime",
                "loop",
                "realtime",
                "reopen_min_s",
                "reopen_max_s",
                "hang_limit_s",
            )
            if any(getattr(before, f) != getattr(cfg, f) for f in structural):
                restart.append(f"pipelines.{name}")
                continue
            if before != cfg:
                self.pipelines[name].update(
                    cfg.conf,
                    cfg.nms,
                    pipeline_filter(cfg),
                    cfg.event_mode,
                    cfg.rate_s,
                    cfg.snapshot,
                )
                live.append(f"pipelines.{name}")
        if old.telemetry != new.telemetry:
            live.append("telemetry")
        self.config = new
        self.revision += 1
        self.publish_reported()
        return {"applied": live, "restart_required": restart, "revision": self.revision}

    def reload(self) -> dict[str, Any]:
        if self.config_path is None:
            from agent.commands import CommandError

            raise CommandError("no_config_file", "the agent was not started from a config file")
        return self.apply_config(load_config(self.config_path))

    def request_restart(self) -> None:
        """Stop with the exit code that makes systemd start us again."""
        self.exit_code = RESTART_EXIT_CODE
        self.stop_event.set()

    # --- main loop --------------------------------------------------------------------

    def run(self) -> int:
        """Feed the watchdog, send telemetry, until the stop event; then shut down."""
        interval = self.notifier.watchdog_interval_s or 5.0
        next_watchdog = 0.0
        next_telemetry = time.monotonic() + min(5.0, self.config.telemetry.interval_s)
        try:
            while not self.stop_event.is_set():
                now = time.monotonic()
                if now >= next_watchdog and self.healthy():
                    self.notifier.watchdog()
                    next_watchdog = now + interval
                if now >= next_telemetry:
                    self.link.publish(
                        self.topic("telemetry"),
                        json.dumps(self.telemetry()),
                        qos=0,
                        priority=Priority.TELEMETRY,
                    )
                    next_telemetry = now + self.config.telemetry.interval_s
                self.stop_event.wait(0.25)
        finally:
            self.shutdown()
        return self.exit_code

    def shutdown(self) -> list[str]:
        """Stop every thread with bounded joins; returns the components that did not stop."""
        self.notifier.stopping()
        self.stop_event.set()
        stuck: list[str] = []
        for name, pipe in self.pipelines.items():
            if not pipe.join(JOIN_TIMEOUT_S):
                stuck.append(f"pipeline:{name}")
            if not pipe.camera.join(JOIN_TIMEOUT_S):
                stuck.append(f"camera:{name}")
        if not self.commands.join(JOIN_TIMEOUT_S):
            stuck.append("commands")
        for ext in self.extensions:
            try:
                if not ext.stop(JOIN_TIMEOUT_S):
                    stuck.append(f"extension:{ext.name}")
            except Exception:
                log.exception("extension %s failed to stop", ext.name)
                stuck.append(f"extension:{ext.name}")
        if self.metrics is not None:
            self.metrics.stop()
        stuck += self.link.stop()
        for pipe in self.pipelines.values():
            pipe.detector.close()
        self.outbox.close()
        self.notifier.close()
        if stuck:
            log.error("did not stop in time: %s", ", ".join(stuck))
        else:
            log.info("agent %s stopped cleanly", self.device_id)
        return stuck


def run_agent(config_path: Path) -> int:
    """`edge-agent run`: load the config, run until SIGTERM/SIGINT, return the exit code."""
    config = load_config(config_path)
    agent = Agent(config, config_path)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        agent.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.start()
    except BaseException:
        agent.shutdown()
        raise
    log.info("pid %d running; SIGTERM stops", os.getpid())
    return agent.run()

"""The OTA extension (`ota`): follows the signed desired state on `edge/<id>/desired` and walks
each pipeline through download, verify, validate, activate, trial, commit or roll back.

One worker thread does every step; MQTT handlers only hand over. Each state is persisted
before the step after it, and reported (`reported.ota`, `events/ota`) as it is entered.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import PipelineConfig
from agent.errors import ConfigError
from agent.mqtt_inbound import InboundMessage
from agent.mqtt_link import LinkState
from agent.ota.downloader import Cancelled, Downloader
from agent.ota.state import BUSY, OtaError, OtaState, PipelineOta, StateFiles, transition
from agent.ota.store import ModelStore
from agent.ota.trial import Snapshot, Trial
from agent.ota.validate import validate_package
from agent.ota.verify import (
    check_files,
    check_manifest,
    check_requirements,
    check_version,
    trusted_keys,
)
from agent.outbox import Priority
from models.desired import DesiredError, DesiredModel, DesiredState, verify_desired
from models.package import Manifest, read_manifest
from models.zoo import resolve
from runtimes.errors import EdgeAgentError

if TYPE_CHECKING:
    from agent.daemon import Agent
    from agent.pipeline import DetectionPipeline

log = logging.getLogger(__name__)

FAULT_ENV = "EDGE_AGENT_OTA_FAULT"  # test hook: "<state>[:<chunks>]" -> SIGKILL ourselves there
_REPORT_EVERY_S = 1.0  # progress in `reported`, at most this often
_SWAP_WAIT_S = 10.0


def create(agent: Agent) -> OtaService | None:
    """The extension factory: None when [ota] is disabled."""
    cfg = agent.config.ota
    if not cfg.enabled:
        return None
    if cfg.chunk_bytes + 4096 > agent.config.mqtt.max_inbound_bytes:
        raise ConfigError(
            f"ota.chunk_bytes {cfg.chunk_bytes} does not fit mqtt.max_inbound_bytes "
            f"{agent.config.mqtt.max_inbound_bytes} (leave 4 KiB for the headers)"
        )
    return OtaService(agent)


class _Fault:
    """Kill the agent with SIGKILL on entering a named state (crash-safety tests)."""

    def __init__(self, spec: str | None) -> None:
        state, _, count = (spec or "").partition(":")
        self.state = state or None
        self.chunks = int(count) if count else None

    def entered(self, state: OtaState) -> None:
        if self.state == state.value and (state is not OtaState.DOWNLOADING or not self.chunks):
            log.warning("OTA fault hook: killing the agent in state %s", state.value)
            os.kill(os.getpid(), signal.SIGKILL)

    def chunk(self, count: int) -> None:
        if self.state == OtaState.DOWNLOADING.value and self.chunks and count >= self.chunks:
            log.warning("OTA fault hook: killing the agent after %d chunks", count)
            os.kill(os.getpid(), signal.SIGKILL)


class OtaService:
    """See the module docstring. Built in Agent.__init__, before the pipelines: a restart
    during an activation or trial rolls the store's pointer back before any model loads."""

    name = "ota"

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.config = agent.config.ota
        self.pipeline_configs = {p.name: p for p in agent.config.pipelines}
        state_dir = agent.config.device.state_dir
        self.store = ModelStore(state_dir).ensure()
        self.files = StateFiles(state_dir)
        self.fault = _Fault(os.environ.get(FAULT_ENV))
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: bytes | None = None  # the newest desired payload not yet handled
        self._thread: threading.Thread | None = None
        self.records = {name: self.files.load(name) for name in self.pipeline_configs}
        saved = self.files.load_desired()
        self.accepted_revision: int | None = saved.get("revision") if saved else None
        self.desired_error: dict[str, Any] | None = None
        self._last_report = 0.0
        self._transfer_started = 0.0
        self._transfer_base = 0
        self.downloader = Downloader(
            agent.link,
            agent.device_id,
            self.store,
            self.config,
            connected=lambda: agent.link.status().state is LinkState.CONNECTED,
        )
        self._recover()
        if saved is not None:
            self._pending = json.dumps(saved).encode()

    # --- extension protocol -----------------------------------------------------------

    def start(self) -> None:
        link = self.agent.link
        link.subscribe(self.agent.topic("blob/data"), self.downloader.on_data, inline=True)
        link.subscribe(self.agent.topic("desired"), self._on_desired)
        self._thread = threading.Thread(target=self._run, name="ota", daemon=True)
        self._thread.start()
        if self._pending is not None:
            self._wake.set()

    def stop(self, timeout: float) -> bool:
        self._wake.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def reported(self) -> dict[str, Any]:
        with self._lock:
            pipelines = {name: self._describe(rec) for name, rec in self.records.items()}
            out: dict[str, Any] = {
                "desired_revision": self.accepted_revision,
                "pipelines": pipelines,
            }
            if self.desired_error is not None:
                out["desired"] = dict(self.desired_error)
            return out

    def telemetry(self) -> dict[str, Any]:
        return {
            "transfer": asdict(self.downloader.stats),
            "states": {name: rec.state.value for name, rec in self.records.items()},
        }

    # --- hand-over from MQTT (worker thread of the link: no work here) --------------------

    def _on_desired(self, message: InboundMessage) -> None:
        with self._lock:
            self._pending = message.payload
        self._wake.set()

    # --- boot ------------------------------------------------------------------------------

    def _recover(self) -> None:
        """A restart in activating or trial rolls back; one mid-download resumes later."""
        for name, rec in self.records.items():
            if rec.state in (OtaState.ACTIVATING, OtaState.TRIAL):
                target = (rec.target or {}).get("package")
                if target:
                    self.store.rollback(name, target)
                    rec.refused[target] = rec.revision or 0
                during = "trial" if rec.state is OtaState.TRIAL else "activation"
                self._enter(rec, OtaState.ROLLED_BACK, f"restarted during {during}")

    # --- the worker ------------------------------------------------------------------------

    def _run(self) -> None:
        stop = self.agent.stop_event
        while not stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            with self._lock:
                payload, self._pending = self._pending, None
            if payload is None:
                continue
            try:
                self._handle(payload)
            except Cancelled:
                continue
            except Exception:  # a bug must not end OTA for good
                log.exception("OTA: handling the desired state failed")

    def _handle(self, payload: bytes) -> None:
        if not payload:
            log.info("OTA: desired state cleared; nothing changes")
            return
        desired = self._check_desired(payload)
        if desired is None:
            return
        for pipeline, model in desired.models.items():
            if self.agent.stop_event.is_set():
                return
            if pipeline not in self.pipeline_configs:
                log.warning(
                    "OTA: desired state names pipeline %s, which is not configured", pipeline
                )
                continue
            self._reconcile(pipeline, model, desired.revision)

    def _check_desired(self, payload: bytes) -> DesiredState | None:
        try:
            doc = json.loads(payload)
            desired = verify_desired(
                doc, trusted_keys(self.agent.config), self.agent.device_id, self.accepted_revision
            )
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._desired_rejected(f"bad_desired: not JSON: {exc}", None)
            return None
        except DesiredError as exc:
            revision = doc.get("revision") if isinstance(doc, dict) else None
            self._desired_rejected(f"bad_desired: {exc}", revision)
            return None
        except OtaError as exc:
            self._desired_rejected(f"bad_desired: {exc.reason}", None)
            return None
        if desired.revision != self.accepted_revision:
            self.files.save_desired(desired.doc)
        with self._lock:
            self.accepted_revision = desired.revision
            self.desired_error = None
        return desired

    def _desired_rejected(self, reason: str, revision: Any) -> None:
        log.warning("OTA: desired state ignored: %s", reason)
        with self._lock:
            self.desired_error = {"state": "rejected", "reason": reason, "revision": revision}
        self._event(None, "rejected", None, reason, revision if isinstance(revision, int) else None)
        if self._thread is not None:
            self.agent.publish_reported()

    def _superseded(self, pipeline: str, package: str) -> bool:
        """True when a newer desired state wants something else for `pipeline`."""
        if self.agent.stop_event.is_set():
            return True
        with self._lock:
            payload = self._pending
        if payload is None:
            return False
        try:
            desired = verify_desired(
                json.loads(payload),
                trusted_keys(self.agent.config),
                self.agent.device_id,
                self.accepted_revision,
            )
        except (EdgeAgentError, ValueError):
            return False
        model = desired.models.get(pipeline)
        return model is not None and model.package_id != package

    # --- one pipeline ------------------------------------------------------------------------

    def _reconcile(self, pipeline: str, model: DesiredModel, revision: int) -> None:
        rec = self.records[pipeline]
        pid = model.package_id
        pointer = self.store.pointer(pipeline)
        if pid == pointer.current and rec.state not in BUSY:
            return  # already running it
        refused_at = rec.refused.get(pid)
        if refused_at is not None and revision <= refused_at:
            return  # refused for this revision already; a higher one retries it
        manifest = model.manifest
        rec.target = {"name": manifest.name, "version": manifest.version, "package": pid}
        rec.revision = revision
        rec.progress = type(rec.progress)()
        try:
            self._update(pipeline, rec, model)
        except Cancelled:
            if not self.agent.stop_event.is_set():
                self._enter(rec, OtaState.REJECTED, "superseded by a newer desired state")
            raise
        except OtaError as exc:
            if self.agent.stop_event.is_set():
                return  # stopping is no verdict: the next start resumes from the record
            if exc.reason.startswith("transfer:"):
                self._enter(rec, OtaState.REJECTED, exc.reason)  # not refused: retried later
            else:
                rec.refused[pid] = revision
                self._enter(rec, OtaState.REJECTED, exc.reason)
        except EdgeAgentError as exc:
            rec.refused[pid] = revision
            self._enter(rec, OtaState.REJECTED, f"error: {exc}")

    def _update(self, pipeline: str, rec: PipelineOta, model: DesiredModel) -> None:
        cfg = self.pipeline_configs[pipeline]
        pid = model.package_id
        self._enter(rec, OtaState.DOWNLOADING)
        trusted = trusted_keys(self.agent.config)
        manifest = check_manifest(model.manifest_doc, trusted)
        check_version(manifest, self._installed(pipeline), model.allow_downgrade)
        check_requirements(manifest)
        if not self.store.has_package(pid):
            self._download(rec, manifest, pid, model.url)
        else:  # staged before (a restart after the download, or a package tried again)
            total = sum(f.size for f in manifest.files)
            with self._lock:
                rec.progress.bytes = rec.progress.total = total
                rec.progress.percent = 100.0
        self._enter(rec, OtaState.VERIFYING)
        try:
            directory = self.store.stage(pid, model.manifest_doc, manifest)
        except OSError as exc:
            raise OtaError(f"stage: {exc}") from exc
        check_files(directory, manifest)
        self._enter(rec, OtaState.VALIDATING)
        result = validate_package(
            directory,
            _runtime_json(cfg),
            cfg.classes,
            self.config.validate_timeout_s,
            self.config.latency_budget_ms,
            self.agent.stop_event,
        )
        log.info("OTA %s: %s validated: %s", pipeline, pid[:12], result)
        if self._superseded(pipeline, pid):
            raise Cancelled()
        self._activate(pipeline, rec, directory)

    def _download(
        self, rec: PipelineOta, manifest: Manifest, pid: str, url: str | None = None
    ) -> None:
        files = manifest.files
        self._transfer_base = self.downloader.held(files)
        self._transfer_started = time.monotonic()
        stats = self.downloader.stats
        start_refetched, start_retries = stats.refetched, stats.retries

        def progress(held: int, total: int, chunks: int) -> None:
            elapsed = max(1e-6, time.monotonic() - self._transfer_started)
            with self._lock:
                p = rec.progress
                p.bytes, p.total = held, total
                p.percent = round(100.0 * held / total, 1) if total else 100.0
                p.bytes_per_s = round((held - self._transfer_base) / elapsed, 1)
                p.refetched_bytes = stats.refetched - start_refetched
                p.retries = stats.retries - start_retries
            now = time.monotonic()
            if now - self._last_report >= _REPORT_EVERY_S or held == total:
                self._last_report = now
                self.agent.publish_reported()
            self.fault.chunk(chunks)

        cancelled = lambda: self._superseded(rec.pipeline, pid)  # noqa: E731
        if url is not None:
            from agent.ota.https import https_fetcher, tls_context

            try:
                via = https_fetcher(
                    url, tls_context(self.config.ca_file), self.config.request_timeout_s
                )
                self.downloader.fetch(files, progress, cancelled, via=via)
                return
            except OtaError as exc:
                if not exc.reason.startswith("transfer:"):
                    raise
                log.warning("OTA %s: %s; fetching over MQTT instead", rec.pipeline, exc.reason)
        self.downloader.fetch(files, progress, cancelled)

    def _installed(self, pipeline: str) -> Manifest | None:
        """The manifest of what the pipeline runs (its current package, or its config model)."""
        current = self.store.pointer(pipeline).current
        try:
            if current is not None and self.store.has_package(current):
                return read_manifest(self.store.package_dir(current))
            return resolve(self.pipeline_configs[pipeline].model).manifest
        except EdgeAgentError:
            return None

    # --- activation, trial, commit, roll back ---------------------------------------------------

    def _activate(self, pipeline: str, rec: PipelineOta, directory: Path) -> None:
        from agent.daemon import build_detector

        cfg = self.pipeline_configs[pipeline]
        pipe = self.agent.pipelines[pipeline]
        pid = directory.name
        self._enter(rec, OtaState.ACTIVATING)
        detector, label = build_detector(cfg, directory)  # loaded before the swap
        baseline = Snapshot.of(pipe)
        self.store.activate(pipeline, pid)
        self._swap(pipe, detector, label)
        trial = Trial(self.config, baseline)
        trial.swapped(pipe)
        rec.trial_started_at = time.time()
        self._enter(rec, OtaState.TRIAL)
        while True:
            if self.agent.stop_event.wait(0.25):
                return  # the next start finds the trial and rolls back
            verdict = trial.check(pipe)
            if verdict.decision == "running":
                continue
            log.info("OTA %s: trial %s: %s", pipeline, verdict.decision, verdict.figures)
            if verdict.decision == "commit":
                self._enter(rec, OtaState.COMMITTED)
                self._collect_garbage()
            else:
                self._roll_back(pipeline, rec, pid, verdict.reason or "trial failed")
            return

    def _swap(self, pipe: DetectionPipeline, detector: Any, label: str) -> None:
        before = pipe.swaps
        pipe.swap_model(detector, label)
        deadline = time.monotonic() + _SWAP_WAIT_S
        while pipe.swaps == before and time.monotonic() < deadline:
            time.sleep(0.01)
        if pipe.swaps == before:
            log.warning(
                "pipeline %s did not take the new model within %.0f s", pipe.name, _SWAP_WAIT_S
            )

    def _roll_back(self, pipeline: str, rec: PipelineOta, failed: str, reason: str) -> None:
        from agent.daemon import build_detector

        cfg = self.pipeline_configs[pipeline]
        pointer = self.store.rollback(pipeline, failed)
        previous = self.store.package_dir(pointer.current) if pointer.current else None
        try:
            detector, label = build_detector(cfg, previous)
        except EdgeAgentError as exc:  # the previous package is gone: the config's model
            log.error(
                "OTA %s: previous model does not load (%s); using the config's", pipeline, exc
            )
            detector, label = build_detector(cfg)
        self._swap(self.agent.pipelines[pipeline], detector, label)
        rec.refused[failed] = rec.revision or 0
        self._enter(rec, OtaState.ROLLED_BACK, reason)

    def _collect_garbage(self) -> None:
        if any(r.state in BUSY for r in self.records.values()):
            return
        keep: set[str] = set()
        for name in self.records:
            pointer = self.store.pointer(name)
            keep |= {p for p in (pointer.current, pointer.previous) if p}
        try:
            self.store.collect_garbage(keep, self.config.keep_packages)
        except OSError as exc:
            log.warning("OTA store clean-up failed: %s", exc)

    # --- state changes and reporting -----------------------------------------------------------

    def _enter(self, rec: PipelineOta, state: OtaState, reason: str | None = None) -> None:
        """Persist, then report: the record on disk is always at least as new as the world."""
        with self._lock:
            transition(rec, state, reason)
            self.files.save(rec)
        if reason:
            log.warning("OTA %s: %s: %s", rec.pipeline, state.value, reason)
        else:
            log.info("OTA %s: %s %s", rec.pipeline, state.value, rec.target)
        self._event(rec.pipeline, state.value, rec.target, reason, rec.revision)
        if self._thread is not None:  # before start() the agent reports once it has started
            self.agent.publish_reported()
        self.fault.entered(state)

    def _event(
        self,
        pipeline: str | None,
        state: str,
        target: dict[str, Any] | None,
        reason: str | None,
        revision: int | None,
    ) -> None:
        body = {
            "pipeline": pipeline,
            "state": state,
            "target": target,
            "reason": reason,
            "revision": revision,
            "ts": round(time.time(), 3),
        }
        self.agent.link.publish(
            self.agent.topic("events/ota"), json.dumps(body), qos=1, priority=Priority.EVENT
        )

    def _describe(self, rec: PipelineOta) -> dict[str, Any]:
        pointer = self.store.pointer(rec.pipeline)
        return {
            "state": rec.state.value,
            "target": rec.target,
            "current": self._package_ref(rec.pipeline, pointer.current),
            "previous": self._package_ref(None, pointer.previous),
            "progress": asdict(rec.progress),
            "reason": rec.reason,
            "revision": rec.revision,
            "updated_at": round(rec.updated_at, 3),
        }

    def _package_ref(self, pipeline: str | None, package: str | None) -> dict[str, Any] | None:
        if package is not None:
            doc = self.store.manifest_doc(package) or {}
            return {"name": doc.get("name"), "version": doc.get("version"), "package": package}
        if pipeline is None:
            return None
        try:
            manifest = resolve(self.pipeline_configs[pipeline].model).manifest
        except EdgeAgentError:
            manifest = None
        if manifest is None:
            return {"name": self.pipeline_configs[pipeline].model, "version": None, "package": None}
        return {"name": manifest.name, "version": manifest.version, "package": None}


def _runtime_json(cfg: PipelineConfig) -> dict[str, Any] | None:
    if cfg.runtime is None:
        return None
    options = asdict(cfg.runtime.runtime_options())
    options.pop("raw_io", None)
    return {"type": cfg.runtime.type, **options}

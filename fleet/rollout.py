"""Staged rollouts: select devices, deploy stage by stage (percentages or counts of the
selection), count commits and failures from `reported`, halt and revert at the threshold.

State lives in the registry (rollouts, rollout_devices), so a restarted driver resumes.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from fleet.deploy import Deployer, ota_entry, outcome
from fleet.mqtt import Message
from fleet.registry import Device, Registry
from runtimes.errors import EdgeAgentError

log = logging.getLogger(__name__)

LEASE_S = 30.0  # a driver that has not beaten its heartbeat for this long is gone


class RolloutError(EdgeAgentError):
    """Bad rollout options, an empty selection, or an unknown rollout."""


def parse_stages(text: str, counts: bool = False) -> list[float]:
    """`1,10,50,100`: percentages (strictly increasing, 0 < p <= 100); with `counts`, device
    counts (`all` allowed as the last)."""
    out: list[float] = []
    for part in text.split(","):
        part = part.strip().rstrip("%")
        if counts and part == "all":
            out.append(math.inf)
            continue
        try:
            value = float(part)
        except ValueError:
            raise RolloutError(f"--stages {text!r}: {part!r} is not a number") from None
        if (
            not math.isfinite(value)
            or value <= 0
            or (not counts and value > 100)
            or (counts and value != int(value))
        ):
            what = "a whole count > 0" if counts else "a percentage in (0, 100]"
            raise RolloutError(f"--stages {text!r}: {part!r} must be {what}")
        out.append(value)
    if not out or any(b <= a for a, b in itertools.pairwise(out)):
        raise RolloutError(f"--stages {text!r}: stages must be strictly increasing")
    return out


def stage_sizes(stages: list[float], total: int, counts: bool = False) -> list[int]:
    """Cumulative device counts per stage (at least one device in the first)."""
    sizes: list[int] = []
    for s in stages:
        n = (
            min(total, int(s) if counts and s != math.inf else total)
            if counts
            else (min(total, max(1, math.ceil(s * total / 100 - 1e-9))))
        )
        if not sizes or n > sizes[-1]:
            sizes.append(n)
    return sizes


def parse_max_failures(text: str, total: int) -> int:
    """`5%` of the selection (rounded down) or an absolute count: failures tolerated; one
    more halts the rollout."""
    raw = text.strip()
    try:
        if raw.endswith("%"):
            pct = float(raw[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            return math.floor(pct * total / 100 + 1e-9)
        count = int(raw)
        if count < 0:
            raise ValueError
        return count
    except ValueError:
        raise RolloutError(
            f"--max-failures {text!r}: expected a percentage like 5% or a count like 2"
        ) from None


def select_devices(registry: Registry, selector: str) -> list[Device]:
    """`all`, `tag=T`, or `id1,id2` (each must be known); revoked devices are left out."""
    devices = {d.id: d for d in registry.devices() if not d.revoked}
    if selector == "all":
        chosen = sorted(devices.values(), key=lambda d: d.id)
    elif selector.startswith("tag="):
        tag = selector[4:]
        chosen = sorted((d for d in devices.values() if tag in d.tags), key=lambda d: d.id)
    else:
        ids = [s.strip() for s in selector.split(",") if s.strip()]
        missing = [i for i in ids if i not in devices]
        if missing:
            raise RolloutError(f"--select: unknown device(s) {', '.join(missing)}")
        chosen = [devices[i] for i in ids]
    if not chosen:
        raise RolloutError(f"--select {selector!r} matches no device in the registry")
    return chosen


Progress = Callable[[str], None]


class RolloutDriver:
    """Drives one rollout to its end; `stop` (an Event) pauses it, resumable later."""

    def __init__(
        self,
        deployer: Deployer,
        rollout_id: int,
        stop: threading.Event,
        progress: Progress | None = None,
        poll_s: float = 0.2,
    ) -> None:
        self.deployer = deployer
        self.registry: Registry = deployer.registry
        self.id = rollout_id
        self.stop = stop
        self.say = progress or (lambda line: log.info("%s", line))
        self.poll_s = poll_s
        self._reported: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def _on_reported(self, msg: Message) -> None:
        if not msg.payload:
            return
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(body, dict):
            with self._lock:
                self._reported[msg.topic.split("/")[1]] = body

    def run(self) -> str:
        """Returns the final state: completed, halted, aborted, or running (stopped)."""
        r = self.registry.rollout(self.id)
        if r["state"] != "running":
            return str(r["state"])
        self.deployer.client.subscribe("edge/+/reported", self._on_reported)
        pid, pipeline = r["package"], r["pipeline"]
        manifest = self.deployer.store.manifest(pid)
        devices = r["devices"]
        sizes: list[int] = r["stages"]
        total = len(devices)
        for index in range(r["stage"], len(sizes)):
            members = self.registry.rollout(self.id)["devices"][: sizes[index]]
            self.registry.set_rollout(self.id, stage=index, heartbeat=time.time())
            self.say(
                f"rollout {self.id}: stage {index + 1}/{len(sizes)}: "
                f"{sizes[index]}/{total} device(s)"
            )
            for d in members:
                if d["state"] == "waiting":
                    rev = self.deployer.deploy(d["device"], pipeline, pid, manifest)
                    self.registry.set_rollout_device(
                        self.id, d["device"], "deployed", f"revision {rev}", stage=index
                    )
            state = self._wait_stage(index, pid, pipeline, r)
            if state != "ok":
                return state
        self.registry.set_rollout(self.id, state="completed", reason=None)
        self.say(f"rollout {self.id}: completed ({total} device(s))")
        return "completed"

    def _wait_stage(self, index: int, pid: str, pipeline: str, r: dict[str, Any]) -> str:
        limit, timeout = int(r["max_failures"]), float(r["device_timeout"])
        last_line = ""
        while True:
            cur = self.registry.rollout(self.id)
            if cur["state"] == "aborted":
                self.say(f"rollout {self.id}: aborted")
                return "aborted"
            now = time.time()
            pending = 0
            for d in cur["devices"]:
                if d["state"] != "deployed":
                    continue
                with self._lock:
                    body = self._reported.get(d["device"])
                out = outcome(body, pipeline, pid) if body else None
                if out is None and now - (d["started_at"] or now) > timeout:
                    out = "timeout"
                if out is None:
                    pending += 1
                    continue
                reason = None
                if out != "committed" and body:
                    reason = ota_entry(body, pipeline).get("reason")
                final = "committed" if out == "committed" else "failed"
                self.registry.set_rollout_device(
                    self.id, d["device"], final, reason or (None if final == "committed" else out)
                )
                self.say(
                    f"rollout {self.id}: {d['device']}: {out}" + (f" ({reason})" if reason else "")
                )
            cur = self.registry.rollout(self.id)
            failed = [d for d in cur["devices"] if d["state"] == "failed"]
            done = sum(1 for d in cur["devices"] if d["state"] == "committed")
            line = (
                f"rollout {self.id}: stage {index + 1}: {done} committed, "
                f"{len(failed)} failed, {pending} pending"
            )
            if line != last_line:
                self.say(line)
                last_line = line
            if len(failed) > limit:
                self._halt(index, cur, len(failed), limit)
                return "halted"
            if pending == 0:
                return "ok"
            self.registry.set_rollout(self.id, heartbeat=now)
            if self.stop.wait(self.poll_s):
                self.say(f"rollout {self.id}: driver stopped; resumes on the next start")
                return "running"

    def _halt(self, index: int, cur: dict[str, Any], failed: int, limit: int) -> None:
        reason = f"{failed} failure(s), more than the {limit} allowed, in stage {index + 1}"
        self.registry.set_rollout(self.id, state="halted", reason=reason)
        self.say(f"rollout {self.id}: halted: {reason}; reverting stage {index + 1}")
        for d in cur["devices"]:
            if d["stage"] != index or d["state"] not in ("committed", "deployed", "failed"):
                continue
            prev = d["previous"]
            if not prev:
                self.registry.set_rollout_device(
                    self.id, d["device"], "revert_unavailable", "no published previous package"
                )
                self.say(f"rollout {self.id}: {d['device']}: cannot revert (no previous package)")
                continue
            manifest = self.deployer.store.manifest(prev)
            rev = self.deployer.deploy(
                d["device"], cur["pipeline"], prev, manifest, allow_downgrade=True
            )
            note = d["reason"] if d["state"] == "failed" else None
            self.registry.set_rollout_device(
                self.id,
                d["device"],
                "reverted",
                f"revision {rev} back to {prev[:12]}" + (f"; failed: {note}" if note else ""),
            )
            self.say(f"rollout {self.id}: {d['device']}: reverted to {prev[:12]}")


def create_rollout(
    deployer: Deployer,
    pid: str,
    pipeline: str | None,
    selector: str,
    stages: list[float],
    counts: bool,
    max_failures: str,
    device_timeout: float,
) -> int:
    """Record a new rollout: the selected devices, stage sizes, each device's previous
    package (its current one, if published here)."""
    chosen = select_devices(deployer.registry, selector)
    sizes = stage_sizes(stages, len(chosen), counts)
    limit = parse_max_failures(max_failures, len(chosen))
    published = set(deployer.store.package_ids())
    pipe = pipeline or Deployer.default_pipeline(chosen[0])
    rows: list[tuple[str, str | None]] = []
    for d in chosen:
        cur = (d.ota(pipe).get("current") or {}).get("package")
        rows.append((d.id, cur if cur in published and cur != pid else None))
    return deployer.registry.create_rollout(
        pid, pipe, selector, [int(s) for s in sizes], limit, device_timeout, rows
    )


def stale_rollouts(registry: Registry, now: float | None = None) -> list[int]:
    """Running rollouts whose driver's heartbeat is older than LEASE_S (or never beat)."""
    now = time.time() if now is None else now
    return [
        r["id"]
        for r in registry.rollouts()
        if r["state"] == "running" and (r["heartbeat"] is None or now - r["heartbeat"] > LEASE_S)
    ]

"""The trial after a model swap: frames, errors, latency and detection rate of the new model
against the previous one, until it is committed or rolled back with the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from agent.config import OtaConfig


class Watched(Protocol):
    """What a trial reads of a pipeline (DetectionPipeline fits)."""

    frames: int
    errors: int
    detections: int

    def stats(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Snapshot:
    frames: int
    errors: int
    detections: int
    p95_ms: float

    @classmethod
    def of(cls, pipe: Watched) -> Snapshot:
        p95 = float(pipe.stats()["latency"]["infer"]["p95_ms"])
        return cls(pipe.frames, pipe.errors, pipe.detections, p95)


@dataclass(frozen=True)
class Verdict:
    decision: str  # "running", "commit" or "rollback"
    reason: str | None = None
    figures: dict[str, float] | None = None


class Trial:
    """Judges the new model from counters taken at the swap (`start`) and now."""

    def __init__(self, config: OtaConfig, baseline: Snapshot, started: float | None = None):
        self.config = config
        self.baseline = baseline  # the old model's figures, taken just before the swap
        self.start: Snapshot | None = None
        self.started = time.monotonic() if started is None else started

    def swapped(self, pipe: Watched) -> None:
        """Call once the pipeline runs the new model: counts start here."""
        self.start = Snapshot(pipe.frames, pipe.errors, pipe.detections, 0.0)
        self.started = time.monotonic()

    def check(self, pipe: Watched, now: float | None = None) -> Verdict:
        cfg = self.config
        now = time.monotonic() if now is None else now
        start = self.start or Snapshot(pipe.frames, pipe.errors, pipe.detections, 0.0)
        frames = pipe.frames - start.frames
        errors = pipe.errors - start.errors
        detections = pipe.detections - start.detections
        elapsed = now - self.started
        attempts = frames + errors
        error_rate = errors / attempts if attempts else 0.0
        p95 = float(pipe.stats()["latency"]["infer"]["p95_ms"])
        base = self.baseline
        base_rate = base.detections / base.frames if base.frames else 0.0
        rate = detections / frames if frames else 0.0
        figures = {
            "frames": frames,
            "errors": errors,
            "error_rate": round(error_rate, 4),
            "p95_ms": p95,
            "baseline_p95_ms": base.p95_ms,
            "detections_per_frame": round(rate, 4),
            "baseline_detections_per_frame": round(base_rate, 4),
            "elapsed_s": round(elapsed, 2),
        }
        min_attempts = max(10, cfg.trial_frames // 4)
        if attempts >= min_attempts and error_rate > cfg.max_error_rate:
            return Verdict(
                "rollback",
                f"trial: error rate {error_rate:.2f} above {cfg.max_error_rate:g}",
                figures,
            )
        done = frames >= cfg.trial_frames and elapsed >= cfg.trial_s
        if not done:
            if elapsed > cfg.trial_timeout_s:
                return Verdict(
                    "rollback",
                    f"trial: only {frames} of {cfg.trial_frames} frames in {elapsed:.0f} s",
                    figures,
                )
            return Verdict("running", None, figures)
        if base.p95_ms > 0 and p95 > base.p95_ms * cfg.max_latency_ratio:
            return Verdict(
                "rollback",
                f"trial: p95 latency {p95:.1f} ms vs {base.p95_ms:.1f} ms before "
                f"(limit x{cfg.max_latency_ratio:g})",
                figures,
            )
        if base_rate > 0 and abs(rate - base_rate) / base_rate > cfg.max_detection_change:
            return Verdict(
                "rollback",
                f"trial: {rate:.2f} detections per frame vs {base_rate:.2f} before "
                f"(limit ±{cfg.max_detection_change:.0%})",
                figures,
            )
        return Verdict("commit", None, figures)

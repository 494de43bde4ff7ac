"""A detection pipeline: the newest camera frame -> detector -> filters -> events, in its own
thread, with per-stage latency figures, hang detection and model swaps between frames.
"""

from __future__ import annotations

import base64
import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from agent.camera import CameraStream, Frame
from models.yolox.detector import YoloxDetector
from models.yolox.postprocess import Detections

log = logging.getLogger(__name__)

Emit = Callable[[str, dict[str, Any]], None]  # (pipeline name, event payload)
STAGES = ("pre", "infer", "post", "total")


def point_in_polygon(x: float, y: float, polygon: Sequence[tuple[float, float]]) -> bool:
    inside = False
    n = len(polygon)
    for i in range(n):
        x1, y1 = polygon[i]
        x2, y2 = polygon[(i + 1) % n]
        if (y1 > y) != (y2 > y) and x < (x2 - x1) * (y - y1) / (y2 - y1) + x1:
            inside = not inside
    return inside


@dataclass(frozen=True)
class DetectionFilter:
    """Keep only some classes, and only boxes whose bottom centre lies in a zone.

    Zones are polygons in coordinates normalised to the frame (0..1).
    """

    classes: frozenset[str] | None = None
    zones: tuple[tuple[tuple[float, float], ...], ...] = ()

    def apply(self, dets: Detections, names: Sequence[str], hw: tuple[int, int]) -> Detections:
        if self.classes is None and not self.zones:
            return dets
        keep = np.ones(len(dets), bool)
        if self.classes is not None:
            keep &= np.array([names[int(c)] in self.classes for c in dets.class_ids], bool)
        if self.zones:
            h, w = hw
            for i, box in enumerate(dets.boxes):
                if keep[i]:
                    cx, bottom = (box[0] + box[2]) / 2 / w, box[3] / h
                    keep[i] = any(point_in_polygon(cx, bottom, z) for z in self.zones)
        return Detections(dets.boxes[keep], dets.scores[keep], dets.class_ids[keep])


@dataclass
class Latency:
    """The last N samples of one stage, in seconds."""

    samples: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=512))

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)

    def percentiles(self) -> dict[str, float]:
        if not self.samples:
            return {"p50_ms": 0.0, "p95_ms": 0.0}
        values = np.fromiter(self.samples, float)
        p50, p95 = np.percentile(values, [50, 95])
        return {"p50_ms": round(float(p50) * 1e3, 3), "p95_ms": round(float(p95) * 1e3, 3)}


class EventPolicy:
    """When to publish: on a change in per-class counts, or at most every `rate_s`."""

    def __init__(self, mode: str, rate_s: float) -> None:
        self.mode, self.rate_s = mode, rate_s
        self._last_counts: dict[str, int] | None = None
        self._last_time = 0.0

    def due(self, counts: dict[str, int], now: float) -> bool:
        if self.mode == "change":
            changed = counts != self._last_counts
            self._last_counts = counts
            return changed
        if not counts or now - self._last_time < self.rate_s:
            return False
        self._last_time = now
        return True


class DetectionPipeline:
    """One camera, one detector; call `start()`, then set the stop event and `join()`."""

    def __init__(
        self,
        name: str,
        camera: CameraStream,
        detector: YoloxDetector,
        emit: Emit,
        stop: threading.Event,
        model_label: str = "model",
        filters: DetectionFilter | None = None,
        event_mode: str = "change",
        rate_s: float = 1.0,
        snapshot: bool = False,
        hang_limit_s: float = 10.0,
    ) -> None:
        self.name, self.camera, self.emit = name, camera, emit
        self.filters = filters or DetectionFilter()
        self.policy = EventPolicy(event_mode, rate_s)
        self.snapshot = snapshot
        self.hang_limit_s = hang_limit_s
        self.latency = {stage: Latency() for stage in STAGES}
        self.frames = self.events = self.errors = 0
        self.detections = 0  # boxes reported (after filters), over all frames
        self.swaps = 0  # model swaps applied
        self.swap_gap: int | None = None  # camera frames skipped across the last swap
        self._swap_after: int | None = None  # index of the last frame the old model saw
        self.last_error: str | None = None
        self.busy_since: float | None = None  # monotonic start of the frame in progress
        self._stop = stop
        self._detector = detector
        self._label = model_label
        self._pending: tuple[YoloxDetector, str] | None = None
        self._swap_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._fps_window: collections.deque[float] = collections.deque(maxlen=120)
        self.last_detections: Detections = Detections.empty()
        self.last_frame: Frame | None = None

    @property
    def model_label(self) -> str:
        return self._label

    @property
    def detector(self) -> YoloxDetector:
        return self._detector

    def swap_model(self, detector: YoloxDetector, label: str) -> None:
        """Use `detector` (already loaded) from the next frame on; the pipeline thread closes
        the old one after the swap, between two frames. `swaps` counts applied swaps."""
        with self._swap_lock:
            replaced, self._pending = self._pending, (detector, label)
        if replaced is not None:  # a swap that never ran: its detector is ours to close
            replaced[0].close()

    def update(
        self,
        conf: float,
        nms: float,
        filters: DetectionFilter,
        event_mode: str,
        rate_s: float,
        snapshot: bool,
    ) -> None:
        """Apply new thresholds, filters and event settings from the next frame on."""
        self._detector.conf, self._detector.nms = conf, nms
        self.filters = filters
        if (event_mode, rate_s) != (self.policy.mode, self.policy.rate_s):
            self.policy = EventPolicy(event_mode, rate_s)
        self.snapshot = snapshot

    def hung(self, now: float | None = None) -> bool:
        """True when one frame has been in the detector longer than the hang limit."""
        started = self.busy_since
        return started is not None and (now or time.monotonic()) - started > self.hang_limit_s

    def fps(self) -> float:
        window = list(self._fps_window)
        if len(window) < 2 or window[-1] <= window[0]:
            return 0.0
        return (len(window) - 1) / (window[-1] - window[0])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"pipeline:{self.name}", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> bool:
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        return {
            "fps": round(self.fps(), 2),
            "frames": self.frames,
            "events": self.events,
            "errors": self.errors,
            "dropped_frames": self.camera.stats.dropped,
            "captured_frames": self.camera.stats.captured,
            "camera_reopens": self.camera.stats.reopens,
            "camera_state": self.camera.state.value,
            "model": self._label,
            "detections": self.detections,
            "swaps": self.swaps,
            "swap_gap_frames": self.swap_gap,
            "hung": self.hung(),
            "latency": {stage: lat.percentiles() for stage, lat in self.latency.items()},
        }

    def _apply_swap(self) -> None:
        with self._swap_lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        old = self._detector
        self._detector, self._label = pending
        self._swap_after = self.last_frame.index if self.last_frame is not None else None
        for lat in self.latency.values():  # the figures are the running model's
            lat.samples.clear()
        self.swaps += 1
        log.info("pipeline %s: now running %s", self.name, self._label)
        old.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._apply_swap()
            frame = self.camera.latest(timeout=0.5)
            if frame is None:
                continue
            try:
                self._process(frame)
            except Exception as exc:  # one bad frame must not end the pipeline
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("pipeline %s: frame %d failed", self.name, frame.index)
            finally:
                self.busy_since = None
        self._apply_swap()

    def _process(self, frame: Frame) -> None:
        detector = self._detector
        clock = time.perf_counter
        self.busy_since = time.monotonic()
        t0 = clock()
        ratio = detector.preprocess(frame.image)
        t1 = clock()
        raw = detector.forward()
        t2 = clock()
        hw = (int(frame.image.shape[0]), int(frame.image.shape[1]))
        dets = self.filters.apply(detector.postprocess(raw, ratio, hw), detector.class_names, hw)
        t3 = clock()
        for stage, seconds in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            self.latency[stage].add(seconds)
        self.frames += 1
        self.detections += len(dets)
        if self._swap_after is not None:
            self.swap_gap = max(0, frame.index - self._swap_after - 1)
            self._swap_after = None
        self._fps_window.append(time.monotonic())
        self.last_detections, self.last_frame = dets, frame
        names = detector.class_names
        counts: dict[str, int] = {}
        for cid in dets.class_ids:
            counts[names[int(cid)]] = counts.get(names[int(cid)], 0) + 1
        if self.policy.due(counts, time.monotonic()):
            self.events += 1
            self.emit(self.name, self._event(frame, dets, counts, names))

    def _event(
        self, frame: Frame, dets: Detections, counts: dict[str, int], names: Sequence[str]
    ) -> dict[str, Any]:
        event: dict[str, Any] = {
            "id": uuid.uuid4().hex,
            "pipeline": self.name,
            "pipeline_seq": self.events,
            "ts": round(frame.timestamp, 3),
            "frame": frame.index,
            "model": self._label,
            "counts": counts,
            "detections": dets.records(names),
        }
        if self.snapshot:
            ok, jpeg = cv2.imencode(".jpg", frame.image, [cv2.IMWRITE_JPEG_QUALITY, 80])
            if ok:
                event["snapshot_jpeg_b64"] = base64.b64encode(jpeg.tobytes()).decode()
        return event

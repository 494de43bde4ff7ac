"""The detection pipeline on the bundled demo clip with a real model: events, filters,
latency figures, model swap between frames, and a hung detector."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from agent.camera import CameraStream
from agent.pipeline import DetectionFilter, DetectionPipeline, EventPolicy, point_in_polygon
from models.yolox.detector import YoloxDetector
from models.yolox.postprocess import Detections
from models.zoo import SAMPLES_DIR
from tests.conftest import PACKAGES

CLIP = SAMPLES_DIR / "demo.mp4"


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


class Sink:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, pipeline: str, event: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(event)


def make(conf: float = 0.25, **kwargs: Any) -> tuple[DetectionPipeline, Sink, threading.Event]:
    stop = threading.Event()
    camera = CameraStream(str(CLIP), stop, loop=True, realtime=True)
    detector = YoloxDetector.from_ref(PACKAGES[("tflite", "int8")], conf=conf)
    sink = Sink()
    pipe = DetectionPipeline("door", camera, detector, sink, stop, model_label="nano@1", **kwargs)
    return pipe, sink, stop


def test_events_carry_detections_and_latency_is_measured() -> None:
    pipe, sink, stop = make(conf=0.0001, event_mode="rate", rate_s=0.0001)
    pipe.camera.start()
    pipe.start()
    assert wait_for(lambda: pipe.frames >= 10)
    stop.set()
    assert pipe.join(10) and pipe.camera.join(10)
    assert sink.events, "no events"
    event = sink.events[0]
    assert event["pipeline"] == "door" and event["model"] == "nano@1"
    assert set(event) >= {"id", "ts", "frame", "counts", "detections"}
    det = event["detections"][0]
    assert set(det) == {"class_id", "class", "score", "box"}
    stats = pipe.stats()
    assert stats["frames"] >= 10 and stats["errors"] == 0
    for stage in ("pre", "infer", "post", "total"):
        assert stats["latency"][stage]["p95_ms"] >= stats["latency"][stage]["p50_ms"] > 0
    assert stats["fps"] > 0


def test_change_mode_only_reports_changes() -> None:
    policy = EventPolicy("change", 1.0)
    assert policy.due({}, 0.0)  # the first state is news
    assert not policy.due({}, 1.0)
    assert policy.due({"star": 1}, 2.0)
    assert not policy.due({"star": 1}, 3.0)
    assert policy.due({"star": 2}, 4.0)
    rate = EventPolicy("rate", 1.0)
    assert rate.due({"ring": 1}, 10.0)
    assert not rate.due({"ring": 1}, 10.5)
    assert not rate.due({}, 12.0)  # nothing detected: nothing to say
    assert rate.due({"ring": 1}, 12.0)


def test_class_and_zone_filters() -> None:
    dets = Detections(
        np.array([[0, 0, 10, 10], [50, 50, 90, 90], [80, 0, 100, 20]], np.float32),
        np.array([0.9, 0.8, 0.7], np.float32),
        np.array([0, 1, 0], np.int32),
    )
    names = ["star", "ring"]
    only_star = DetectionFilter(classes=frozenset({"star"})).apply(dets, names, (100, 100))
    assert only_star.class_ids.tolist() == [0, 0]
    left_half = ((0.0, 0.0), (0.5, 0.0), (0.5, 1.0), (0.0, 1.0))
    zoned = DetectionFilter(zones=(left_half,)).apply(dets, names, (100, 100))
    assert zoned.boxes.tolist() == [[0, 0, 10, 10]]
    assert point_in_polygon(0.25, 0.5, left_half) and not point_in_polygon(0.75, 0.5, left_half)


def test_model_swap_happens_between_frames() -> None:
    pipe, sink, stop = make(conf=0.0001, event_mode="rate", rate_s=0.0001)
    pipe.camera.start()
    pipe.start()
    assert wait_for(lambda: pipe.frames >= 3)
    new = YoloxDetector.from_ref(PACKAGES[("onnx", "fp32")], conf=0.0001)
    pipe.swap_model(new, "nano@2")
    assert wait_for(lambda: any(e["model"] == "nano@2" for e in sink.events))
    stop.set()
    assert pipe.join(10)
    labels = [e["model"] for e in sink.events]
    first_new = labels.index("nano@2")
    assert set(labels[:first_new]) == {"nano@1"} and set(labels[first_new:]) == {"nano@2"}
    assert pipe.detector is new and pipe.errors == 0


def test_a_hung_detector_is_reported() -> None:
    pipe, _, stop = make(hang_limit_s=0.2)
    release = threading.Event()
    real_forward = pipe.detector.forward

    def stuck_forward() -> np.ndarray:
        release.wait(10)
        return real_forward()

    pipe.detector.forward = stuck_forward  # type: ignore[method-assign]
    pipe.camera.start()
    pipe.start()
    assert wait_for(lambda: pipe.hung())
    assert pipe.stats()["hung"] is True
    release.set()
    stop.set()
    assert pipe.join(10)
    assert not pipe.hung()


def test_a_frame_that_fails_is_counted_and_the_pipeline_goes_on() -> None:
    pipe, _, stop = make()
    calls = {"n": 0}
    real_forward = pipe.detector.forward

    def flaky_forward() -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("delegate lost")
        return real_forward()

    pipe.detector.forward = flaky_forward  # type: ignore[method-assign]
    pipe.camera.start()
    pipe.start()
    assert wait_for(lambda: pipe.frames >= 5)
    stop.set()
    assert pipe.join(10)
    assert pipe.errors == 1 and "delegate lost" in (pipe.last_error or "")


@pytest.mark.parametrize("snapshot", [True, False])
def test_snapshot_in_events(snapshot: bool) -> None:
    pipe, sink, stop = make(conf=0.0001, snapshot=snapshot)
    pipe.camera.start()
    pipe.start()
    assert wait_for(lambda: len(sink.events) >= 1)
    stop.set()
    pipe.join(10)
    assert ("snapshot_jpeg_b64" in sink.events[0]) is snapshot

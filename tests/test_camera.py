"""Camera streams on real video files: newest-frame hand-off, drop counting, pacing, end of
file, looping, and a source that disappears and comes back."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.camera import (
    ALLOWED,
    CameraStream,
    SourceError,
    SourceKind,
    SourceSpec,
    StreamState,
)


def write_clip(path: Path, frames: int = 20, fps: float = 20.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (64, 48))
    for i in range(frames):
        image = np.full((48, 64, 3), (i * 10) % 256, np.uint8)
        writer.write(image)
    writer.release()
    return path


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize(
    "text,kind,target",
    [
        ("0", SourceKind.DEVICE, 0),
        ("/dev/video2", SourceKind.DEVICE, "/dev/video2"),
        ("rtsp://cam.local:554/stream1", SourceKind.STREAM, "rtsp://cam.local:554/stream1"),
        ("http://10.0.0.5/mjpeg", SourceKind.STREAM, "http://10.0.0.5/mjpeg"),
        ("clips/door.mp4", SourceKind.FILE, "clips/door.mp4"),
        ("file:///data/a.mp4", SourceKind.FILE, "/data/a.mp4"),
        (
            "nvarguscamerasrc ! nvvidconv ! appsink",
            SourceKind.GSTREAMER,
            "nvarguscamerasrc ! nvvidconv ! appsink",
        ),
        (
            "gst: v4l2src ! videoconvert ! appsink",
            SourceKind.GSTREAMER,
            "v4l2src ! videoconvert ! appsink",
        ),
    ],
)
def test_source_strings(text: str, kind: SourceKind, target: str | int) -> None:
    spec = SourceSpec.parse(text)
    assert (spec.kind, spec.target) == (kind, target)


def test_empty_source_is_an_error() -> None:
    with pytest.raises(SourceError):
        SourceSpec.parse("  ")


def test_state_machine_has_no_way_out_of_stopped() -> None:
    assert ALLOWED[StreamState.STOPPED] == set()
    assert StreamState.STREAMING in ALLOWED[StreamState.OPENING]
    assert StreamState.STREAMING not in ALLOWED[StreamState.IDLE]


def test_file_without_loop_reads_every_frame_then_ends(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "a.mp4", frames=15)
    stop = threading.Event()
    cam = CameraStream(str(clip), stop, loop=False, realtime=False)
    cam.start()
    seen = []
    while True:
        frame = cam.latest(timeout=5)
        if frame is None:
            break
        seen.append(frame.index)
        time.sleep(0.002)
    assert cam.state is StreamState.ENDED
    assert cam.stats.captured == 15
    assert len(seen) + cam.stats.dropped == 15
    assert seen == sorted(seen)
    stop.set()
    assert cam.join(5)
    assert cam.state is StreamState.STOPPED


def test_slow_consumer_gets_the_newest_frame_and_drops_are_counted(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "b.mp4", frames=40)
    stop = threading.Event()
    cam = CameraStream(str(clip), stop, loop=False, realtime=False, every_frame=False)
    cam.start()
    assert wait_for(lambda: cam.state is StreamState.ENDED)
    frame = cam.latest(timeout=1)
    assert frame is not None and frame.index == 39  # only the newest survives
    assert cam.stats.dropped == 39
    assert cam.latest(timeout=0.1) is None  # nothing newer than what we took
    stop.set()
    cam.join(5)


def test_a_file_read_flat_out_hands_out_every_frame(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "e.mp4", frames=30)
    stop = threading.Event()
    cam = CameraStream(str(clip), stop, loop=False, realtime=False)
    cam.start()
    seen = []
    while (frame := cam.latest(timeout=5)) is not None:
        seen.append(frame.index)
        time.sleep(0.01)  # slower than decoding: a live camera would drop frames here
    assert seen == list(range(30))
    assert cam.stats.dropped == 0
    stop.set()
    assert cam.join(5)


def test_realtime_pacing_follows_the_file_fps(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "c.mp4", frames=10, fps=20.0)
    stop = threading.Event()
    cam = CameraStream(str(clip), stop, loop=False, realtime=True)
    started = time.monotonic()
    cam.start()
    assert wait_for(lambda: cam.state is StreamState.ENDED)
    assert time.monotonic() - started >= 0.4  # 10 frames at 20 fps: about 0.5 s
    assert cam.fps == pytest.approx(20.0)
    stop.set()
    cam.join(5)


def test_looping_file_keeps_going(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "d.mp4", frames=5)
    stop = threading.Event()
    cam = CameraStream(str(clip), stop, loop=True, realtime=False, every_frame=False)
    cam.start()
    assert wait_for(lambda: cam.stats.captured > 12)
    assert cam.stats.reopens >= 2 and cam.stats.failures == 0
    stop.set()
    assert cam.join(5)


def test_source_that_disappears_is_reopened_with_backoff(tmp_path: Path) -> None:
    clip = tmp_path / "cam.mp4"
    write_clip(clip, frames=5)
    stop = threading.Event()
    cam = CameraStream(
        str(clip),
        stop,
        loop=True,
        realtime=False,
        every_frame=False,
        backoff_min_s=0.05,
        backoff_max_s=0.2,
    )
    cam.start()
    assert wait_for(lambda: cam.stats.captured >= 5)
    clip.unlink()  # the camera is unplugged
    assert wait_for(lambda: cam.stats.failures >= 2)
    assert cam.state in (StreamState.BACKOFF, StreamState.OPENING)
    before = cam.stats.captured
    write_clip(clip, frames=5)  # and plugged back in
    assert wait_for(lambda: cam.stats.captured > before)
    assert cam.stats.last_error
    stop.set()
    assert cam.join(5)


def test_open_errors_never_kill_the_thread() -> None:
    calls = []

    def opener(spec: SourceSpec) -> None:
        calls.append(time.monotonic())
        raise RuntimeError("driver exploded")

    stop = threading.Event()
    cam = CameraStream("/dev/video9", stop, backoff_min_s=0.02, backoff_max_s=0.08, opener=opener)
    cam.start()
    assert wait_for(lambda: len(calls) >= 5)
    assert "driver exploded" in (cam.stats.last_error or "")
    gaps = np.diff(calls[:5])
    assert gaps[-1] > gaps[0]  # backoff grows
    stop.set()
    assert cam.join(5)

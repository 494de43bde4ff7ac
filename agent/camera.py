"""Camera sources over OpenCV (V4L2 device, RTSP/HTTP URL, video file, GStreamer pipeline):
a capture thread that keeps only the newest frame, counts drops, and reopens with backoff.
"""

from __future__ import annotations

import enum
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from runtimes.errors import EdgeAgentError

log = logging.getLogger(__name__)


class SourceError(EdgeAgentError):
    """A camera source string cannot be understood."""


class SourceKind(enum.Enum):
    DEVICE = "device"  # V4L2 index or /dev/videoN
    STREAM = "stream"  # rtsp://, http(s)://
    FILE = "file"
    GSTREAMER = "gstreamer"


class StreamState(enum.Enum):
    """The capture thread's states; `ALLOWED` lists the moves from each."""

    IDLE = "idle"
    OPENING = "opening"
    STREAMING = "streaming"
    BACKOFF = "backoff"
    ENDED = "ended"  # a file that does not loop has been read to the end
    STOPPED = "stopped"


ALLOWED: dict[StreamState, set[StreamState]] = {
    StreamState.IDLE: {StreamState.OPENING, StreamState.STOPPED},
    StreamState.OPENING: {StreamState.STREAMING, StreamState.BACKOFF, StreamState.STOPPED},
    StreamState.STREAMING: {
        StreamState.OPENING,  # a looping file starts again
        StreamState.BACKOFF,
        StreamState.ENDED,
        StreamState.STOPPED,
    },
    StreamState.BACKOFF: {StreamState.OPENING, StreamState.STOPPED},
    StreamState.ENDED: {StreamState.STOPPED},
    StreamState.STOPPED: set(),
}


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source string: what to hand OpenCV and with which backend."""

    kind: SourceKind
    target: str | int
    text: str

    @staticmethod
    def parse(text: str) -> SourceSpec:
        raw = text.strip()
        if not raw:
            raise SourceError("empty camera source")
        if raw.startswith("gst:"):
            return SourceSpec(SourceKind.GSTREAMER, raw[4:].strip(), raw)
        if "!" in raw and "appsink" in raw:
            return SourceSpec(SourceKind.GSTREAMER, raw, raw)
        if raw.isdigit():
            return SourceSpec(SourceKind.DEVICE, int(raw), raw)
        if raw.startswith("/dev/video"):
            return SourceSpec(SourceKind.DEVICE, raw, raw)
        if raw.split("://", 1)[0].lower() in ("rtsp", "rtsps", "http", "https", "rtmp", "udp"):
            return SourceSpec(SourceKind.STREAM, raw, raw)
        if raw.startswith("file://"):
            raw = raw[len("file://") :]
        return SourceSpec(SourceKind.FILE, raw, text)

    def open(self) -> cv2.VideoCapture:
        if self.kind is SourceKind.GSTREAMER:
            return cv2.VideoCapture(str(self.target), cv2.CAP_GSTREAMER)
        if self.kind is SourceKind.DEVICE:
            return cv2.VideoCapture(self.target, cv2.CAP_V4L2)
        if self.kind is SourceKind.STREAM:
            return cv2.VideoCapture(str(self.target), cv2.CAP_FFMPEG)
        return cv2.VideoCapture(str(self.target))


@dataclass(frozen=True)
class Frame:
    """One captured frame: its sequence number from this stream, capture time, pixels."""

    index: int
    timestamp: float
    image: np.ndarray


@dataclass
class StreamStats:
    captured: int = 0
    dropped: int = 0  # captured but replaced before anyone took it
    reopens: int = 0
    failures: int = 0
    last_error: str | None = None


Opener = Callable[[SourceSpec], Any]


class CameraStream:
    """Reads one source in its own thread; `latest()` hands out the newest frame only."""

    def __init__(
        self,
        source: str,
        stop: threading.Event,
        loop: bool = True,
        realtime: bool = True,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 30.0,
        read_timeout_s: float = 10.0,
        opener: Opener | None = None,
        every_frame: bool | None = None,
    ) -> None:
        self.spec = SourceSpec.parse(source)
        if self.spec.kind is SourceKind.FILE and not Path(str(self.spec.target)).exists():
            log.warning("camera source %s does not exist (yet); will keep trying", source)
        self.loop = loop
        self.realtime = realtime and self.spec.kind is SourceKind.FILE
        # A file read flat out waits for the consumer to take each frame instead of
        # decoding frames only to drop them: every frame is analysed, and no CPU goes to
        # frames nobody sees. Live sources always keep only the newest frame.
        if every_frame is None:
            every_frame = not self.realtime
        self.every_frame = every_frame and self.spec.kind is SourceKind.FILE
        self.backoff_min_s, self.backoff_max_s = backoff_min_s, backoff_max_s
        self.read_timeout_s = read_timeout_s
        self.stats = StreamStats()
        self._stop = stop
        self._open = opener or (lambda spec: spec.open())
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._taken = -1
        self._state = StreamState.IDLE
        self._thread: threading.Thread | None = None
        self.width = self.height = 0
        self.fps = 0.0

    @property
    def state(self) -> StreamState:
        return self._state

    def _move(self, new: StreamState) -> None:
        if new not in ALLOWED[self._state]:
            raise RuntimeError(f"camera {self.spec.text}: {self._state.value} -> {new.value}")
        log.debug("camera %s: %s -> %s", self.spec.text, self._state.value, new.value)
        with self._cond:
            self._state = new
            self._cond.notify_all()

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"camera:{self.spec.text}", daemon=True
        )
        self._thread.start()

    def join(self, timeout: float) -> bool:
        """Wait for the capture thread after the stop event is set; False if it is stuck."""
        if self._thread is None:
            return True
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def latest(self, timeout: float) -> Frame | None:
        """The newest frame not handed out before; None after `timeout` or at the end."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                frame = self._latest
                if frame is not None and frame.index > self._taken:
                    self._taken = frame.index
                    self._cond.notify_all()  # a reader waiting to hand out the next one
                    return frame
                if self._stop.is_set() or self._state in (StreamState.ENDED, StreamState.STOPPED):
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def newest(self) -> Frame | None:
        """The newest frame, whether or not it was handed out (for snapshots)."""
        with self._cond:
            return self._latest

    def _publish(self, image: np.ndarray) -> None:
        with self._cond:
            if self.every_frame:
                while (
                    self._latest is not None
                    and self._latest.index > self._taken
                    and not self._stop.is_set()
                ):
                    self._cond.wait(0.5)
            index = self.stats.captured
            if self._latest is not None and self._latest.index > self._taken:
                self.stats.dropped += 1
            self._latest = Frame(index, time.time(), image)
            self.stats.captured += 1
            self._cond.notify_all()

    def _run(self) -> None:
        delay = self.backoff_min_s
        try:
            while not self._stop.is_set():
                self._move(StreamState.OPENING)
                capture = None
                try:
                    capture = self._open(self.spec)
                    if capture is None or not capture.isOpened():
                        raise OSError("cannot open")
                    self._move(StreamState.STREAMING)
                    got_any, ended = self._read_all(capture)
                except Exception as exc:  # a source may fail in any way; we reopen
                    got_any, ended = False, False
                    self.stats.last_error = f"{type(exc).__name__}: {exc}"
                finally:
                    if capture is not None:
                        capture.release()
                if self._stop.is_set():
                    break
                if ended and got_any and self.spec.kind is SourceKind.FILE:
                    if not self.loop:
                        self._move(StreamState.ENDED)
                        self._stop.wait()  # stay ended until the agent stops
                        break
                    self.stats.reopens += 1
                    delay = self.backoff_min_s
                    continue  # loop the file: straight back to OPENING
                if got_any:
                    delay = self.backoff_min_s
                self.stats.failures += 1
                self.stats.reopens += 1
                self._move(StreamState.BACKOFF)
                sleep = delay * random.uniform(0.8, 1.2)
                log.warning(
                    "camera %s failed (%s); reopening in %.1f s",
                    self.spec.text,
                    self.stats.last_error or "no frames",
                    sleep,
                )
                self._stop.wait(sleep)
                delay = min(self.backoff_max_s, delay * 2)
        finally:
            if self._state is not StreamState.STOPPED:
                self._state = StreamState.STOPPED
            with self._cond:
                self._cond.notify_all()

    def _read_all(self, capture: Any) -> tuple[bool, bool]:
        """Read until failure or the end; (got any frame, reached the end of a file)."""
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if 0 < fps < 1000 else 0.0
        period = 1.0 / self.fps if self.realtime and self.fps else 0.0
        got_any = False
        next_due = time.monotonic()
        last_ok = time.monotonic()
        while not self._stop.is_set():
            ok, image = capture.read()
            if not ok or image is None:
                if self.spec.kind is SourceKind.FILE:
                    return got_any, True
                if time.monotonic() - last_ok > self.read_timeout_s or not got_any:
                    self.stats.last_error = "read failed"
                    return got_any, False
                time.sleep(0.01)
                continue
            last_ok = time.monotonic()
            if not got_any:
                self.height, self.width = image.shape[:2]
            got_any = True
            self._publish(image)
            if period:
                next_due += period
                wait = next_due - time.monotonic()
                if wait > 0:
                    self._stop.wait(wait)
                else:
                    next_due = time.monotonic()
        return got_any, False

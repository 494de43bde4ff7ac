"""The demo clip (moving objects over a panning background, with per-frame truth) and stills.

Both reuse the data set's shapes, paint and occlusion rules, so a model trained on it fits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .backgrounds import FloatImage, background
from .dataset import SynthDataError, coco_document, image_rng
from .paint import STABLE_STYLES, Paint, cast_shadow, render, sample_paint
from .scene import Scene, SceneConfig, render_jpeg
from .shapes import CLASS_NAMES, Points, Pose, rasterize, sample_aspect, unit_contours

FOURCC = "mp4v"  # written and read back by opencv-python-headless's FFmpeg
_PAN_MARGIN = 1.35  # the panorama is this much larger than a frame on each axis
MIN_VISIBLE = 0.4
MIN_BOX = 8


@dataclass(frozen=True)
class _Track:
    """One object crossing the frame along a quadratic Bezier path."""

    cls: int
    unit: list[Points]
    paint: Paint
    size: float
    aspect: float
    t0: float  # s: when it is at p0
    duration: float  # s: from p0 to p2
    path: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    angle0: float
    spin: float  # degrees per second
    shadow_seed: int | None

    def pose(self, t: float) -> Pose | None:
        u = (t - self.t0) / self.duration
        if not 0.0 <= u <= 1.0:
            return None
        (ax, ay), (bx, by), (cx, cy) = self.path
        x = (1 - u) ** 2 * ax + 2 * (1 - u) * u * bx + u**2 * cx
        y = (1 - u) ** 2 * ay + 2 * (1 - u) * u * by + u**2 * cy
        return Pose(x, y, self.size, self.aspect, self.angle0 + self.spin * (t - self.t0))


def _edge_point(
    rng: np.random.Generator, w: int, h: int, margin: float, edge: int
) -> tuple[float, float]:
    """A point just outside edge 0 (left), 1 (top), 2 (right) or 3 (bottom)."""
    if edge == 0:
        return -margin, float(rng.uniform(0.1 * h, 0.9 * h))
    if edge == 1:
        return float(rng.uniform(0.1 * w, 0.9 * w)), -margin
    if edge == 2:
        return w + margin, float(rng.uniform(0.1 * h, 0.9 * h))
    return float(rng.uniform(0.1 * w, 0.9 * w)), h + margin


def _tracks(
    rng: np.random.Generator, w: int, h: int, seconds: float, bg_mean: tuple[float, float, float]
) -> list[_Track]:
    """Objects arriving as a Poisson process, about five on screen at a time."""
    tracks: list[_Track] = []
    mean_duration, concurrent = 5.5, 5.0
    t = -mean_duration  # start early so that the first frame already has objects
    while t < seconds:
        t += float(rng.exponential(mean_duration / concurrent))
        cls = int(rng.integers(len(CLASS_NAMES)))
        size = math.exp(rng.uniform(math.log(24.0), math.log(0.3 * min(w, h))))
        margin = size * 0.75 + 2.0
        entry = int(rng.integers(4))
        exit_edge = (entry + int(rng.integers(1, 4))) % 4
        p0 = _edge_point(rng, w, h, margin, entry)
        p2 = _edge_point(rng, w, h, margin, exit_edge)
        p1 = (float(rng.uniform(0.15 * w, 0.85 * w)), float(rng.uniform(0.15 * h, 0.85 * h)))
        tracks.append(
            _Track(
                cls=cls,
                unit=unit_contours(cls, rng),
                paint=sample_paint(rng, bg_mean, STABLE_STYLES),
                size=size,
                aspect=sample_aspect(cls, rng),
                t0=t,
                duration=float(rng.uniform(3.5, 8.0)),
                path=(p0, p1, p2),
                angle0=float(rng.uniform(0, 360)),
                spin=float(rng.uniform(-60, 60)) if rng.random() < 0.7 else 0.0,
                shadow_seed=int(rng.integers(2**31 - 1)) if rng.random() < 0.3 else None,
            )
        )
    return tracks


def _pan(
    panorama: FloatImage, w: int, h: int, t: float, seconds: float, phase: tuple[float, float]
) -> FloatImage:
    """The frame-sized view of the panorama at time t (sub-pixel, slow Lissajous path)."""
    ph, pw = panorama.shape[:2]
    ox = (pw - w) * (0.5 + 0.5 * math.sin(2 * math.pi * t / (1.7 * seconds) + phase[0]))
    oy = (ph - h) * (0.5 + 0.5 * math.sin(2 * math.pi * t / (2.3 * seconds) + phase[1]))
    m = np.array([[1.0, 0.0, -ox], [0.0, 1.0, -oy]], np.float32)
    view = cv2.warpAffine(
        panorama, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    return np.ascontiguousarray(view, dtype=np.float32)


def render_clip(
    out: Path,
    seconds: float = 15.0,
    fps: float = 15.0,
    size: tuple[int, int] = (640, 480),
    seed: int = 1,
    truth: Path | None = None,
) -> dict[str, Any]:
    """Write the clip to `out` and its per-frame boxes to `truth` (default: out with .json).

    Truth: {"frames": [[{track, class, category_id, bbox: [x1, y1, x2, y2], visible}, ...],
    ...]} indexed by frame; x2 = x1 + width (pixel edges). Objects less than 40 % visible
    (hidden or outside the frame) are left out, as in the data set.
    """
    w, h = size
    n_frames = round(seconds * fps)
    if n_frames < 1 or w < 32 or h < 32:
        raise SynthDataError(f"clip too small: {n_frames} frames of {w}x{h}")
    rng = image_rng(seed, "clip", 0)
    panorama = background(
        rng, int(h * _PAN_MARGIN), int(w * _PAN_MARGIN), photo_fraction=0.8, clutter_max=5
    )
    mean = panorama.reshape(-1, 3).mean(axis=0)
    tracks = _tracks(rng, w, h, seconds, (float(mean[0]), float(mean[1]), float(mean[2])))
    phase = (float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0, 2 * math.pi)))
    light = (float(rng.uniform(0.08, 0.15)), float(rng.uniform(0, 2 * math.pi)))
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(
        str(out), cv2.CAP_FFMPEG, cv2.VideoWriter.fourcc(*FOURCC), float(fps), (w, h)
    )
    if not writer.isOpened():
        raise SynthDataError(f"OpenCV cannot write {FOURCC!r} video to {out}")
    frames: list[list[dict[str, Any]]] = []
    try:
        for i in range(n_frames):
            t = i / fps
            scene = Scene(_pan(panorama, w, h, t, seconds, phase), MIN_VISIBLE)
            ids: list[int] = []
            for k, track in enumerate(tracks):
                pose = track.pose(t)
                if pose is None:
                    continue
                alpha, x0, y0 = rasterize(pose.apply(track.unit))
                if track.shadow_seed is not None:
                    cast_shadow(
                        scene.canvas, alpha, x0, y0, np.random.default_rng(track.shadow_seed)
                    )
                scene.add(track.cls, alpha, render(track.paint, alpha), x0, y0)
                ids.append(k)
            gain = 1.0 + light[0] * math.sin(2 * math.pi * t / max(seconds, 1.0) + light[1])
            noise = np.random.default_rng([seed, i]).standard_normal(
                scene.canvas.shape, dtype=np.float32
            )
            frame = np.clip(
                scene.canvas * np.float32(gain) + noise * np.float32(1.5) + 0.5, 0, 255
            ).astype(np.uint8)
            writer.write(frame)
            frames.append(
                [
                    {
                        "track": ids[b.layer],
                        "class": CLASS_NAMES[b.cls],
                        "category_id": b.cls + 1,
                        "bbox": [b.x, b.y, b.x + b.w, b.y + b.h],
                        "visible": round(b.visible, 3),
                    }
                    for b in scene.boxes(MIN_BOX)
                ]
            )
    finally:
        writer.release()
    doc = {
        "video": out.name,
        "fps": fps,
        "width": w,
        "height": h,
        "frame_count": n_frames,
        "seed": seed,
        "classes": list(CLASS_NAMES),
        "min_visible": MIN_VISIBLE,
        "bbox_format": "x1,y1,x2,y2",
        "frames": frames,
    }
    truth_path = truth if truth is not None else out.with_suffix(".json")
    truth_path.write_text(json.dumps(doc, separators=(",", ":")))
    return {
        "path": str(out),
        "truth": str(truth_path),
        "frames": n_frames,
        "bytes": out.stat().st_size,
        "tracks": len(tracks),
        "boxes": sum(len(f) for f in frames),
    }


def count_frames(path: Path) -> int:
    """Frames that cv2.VideoCapture decodes from `path` (0 when it cannot open it)."""
    cap = cv2.VideoCapture(str(path))
    n = 0
    try:
        while cap.isOpened():
            ok, _ = cap.read()
            if not ok:
                break
            n += 1
    finally:
        cap.release()
    return n


STILL_CONFIG = SceneConfig(
    sizes=((640, 480),), min_size=20.0, max_size_frac=0.35, empty_fraction=0.0, mean_objects=6.0
)


def render_stills(
    folder: Path, seed: int = 1, count: int = 4, config: SceneConfig = STILL_CONFIG
) -> Path:
    """Write still_{i}.jpg and their COCO annotations stills.json into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(count):
        data, w, h, boxes = render_jpeg(image_rng(seed, "stills", i), config)
        name = f"still_{i}.jpg"
        (folder / name).write_bytes(data)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for b in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": b.cls + 1,
                    "bbox": [float(b.x), float(b.y), float(b.w), float(b.h)],
                    "area": float(b.area),
                    "iscrowd": 0,
                    "visible": round(b.visible, 3),
                }
            )
    doc = coco_document(
        images,
        annotations,
        {"description": "edge-agent synthetic shapes: demo stills", "seed": seed},
    )
    path = folder / "stills.json"
    path.write_text(json.dumps(doc, indent=1))
    return path

"""One synthetic image: objects placed over a background with occlusion, then camera effects.

`Scene` tracks what of each object is still visible; `compose` and `render_jpeg` use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from .backgrounds import FloatImage, Image, background
from .paint import blend, cast_shadow, mean_color, render, sample_paint
from .shapes import CLASS_NAMES, FloatArray, Pose, extent, rasterize, sample_aspect, unit_contours

# (width, height) choices, repeated entries weigh more: widths 320-640, some non-square.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = (
    (416, 416),
    (416, 416),
    (416, 416),
    (640, 480),
    (640, 480),
    (512, 384),
    (640, 360),
    (320, 320),
    (480, 480),
    (384, 512),
    (320, 240),
    (576, 432),
)


@dataclass(frozen=True)
class SceneConfig:
    """The knobs of the image generator; the defaults are the training data set's."""

    sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES  # (width, height) drawn uniformly
    min_size: float = 12.0  # px: smallest object side before rotation
    max_size_frac: float = 0.4  # largest object side as a fraction of the short image side
    mean_objects: float = 4.5  # mean objects per image (1 + Poisson)
    max_objects: int = 12
    min_visible: float = 0.4  # an object more hidden than 1 - this is not annotated
    min_box: int = 8  # px: smallest annotated box side
    empty_fraction: float = 0.02  # images with no object (negatives)
    photo_fraction: float = 0.6  # backgrounds from photographs rather than textures
    clutter_max: int = 6  # distractors per image, 0..this
    edge_fraction: float = 0.15  # objects that may cross the image border
    overlap_fraction: float = 0.3  # objects put next to an earlier one so that they overlap
    shadow_prob: float = 0.25
    blur_prob: float = 0.3
    noise_prob: float = 0.45
    jpeg_quality: tuple[int, int] = (65, 95)  # inclusive range


@dataclass(frozen=True)
class Box:
    """A visible object: COCO box (x, y, w, h) in px, visible pixel area and fraction."""

    cls: int
    x: int
    y: int
    w: int
    h: int
    area: int
    visible: float
    layer: int


@dataclass
class _Layer:
    cls: int
    x0: int
    y0: int
    vis: FloatArray  # coverage still seen, same shape as the full coverage patch
    full: int  # pixels of the whole shape (coverage > 0.5), wherever it lies
    visible: int  # pixels still seen inside the image


def _overlap(
    ax: int, ay: int, ah: int, aw: int, bx: int, by: int, bh: int, bw: int, ih: int, iw: int
) -> tuple[slice, slice, slice, slice] | None:
    """Slices into patch a and patch b where both overlap each other and the image."""
    x0, y0 = max(ax, bx, 0), max(ay, by, 0)
    x1, y1 = min(ax + aw, bx + bw, iw), min(ay + ah, by + bh, ih)
    if x0 >= x1 or y0 >= y1:
        return None
    return (
        slice(y0 - ay, y1 - ay),
        slice(x0 - ax, x1 - ax),
        slice(y0 - by, y1 - by),
        slice(x0 - bx, x1 - bx),
    )


@dataclass
class Scene:
    """Objects painted onto a canvas in order, each later one hiding what is under it."""

    canvas: FloatImage
    min_visible: float = 0.4
    layers: list[_Layer] = field(default_factory=list)

    def _in_image(self, vis: FloatArray, x0: int, y0: int) -> int:
        ih, iw = self.canvas.shape[:2]
        o = _overlap(x0, y0, vis.shape[0], vis.shape[1], 0, 0, ih, iw, ih, iw)
        return 0 if o is None else int(np.count_nonzero(vis[o[0], o[1]] > 0.5))

    def fits(self, alpha: FloatArray, x0: int, y0: int) -> bool:
        """True when adding `alpha` at (x0, y0) leaves every annotatable object annotatable."""
        ih, iw = self.canvas.shape[:2]
        for layer in self.layers:
            if layer.visible < self.min_visible * layer.full:
                continue
            o = _overlap(
                layer.x0,
                layer.y0,
                layer.vis.shape[0],
                layer.vis.shape[1],
                x0,
                y0,
                alpha.shape[0],
                alpha.shape[1],
                ih,
                iw,
            )
            if o is None:
                continue
            seen = layer.vis[o[0], o[1]]
            lost = np.count_nonzero(seen > 0.5) - np.count_nonzero(
                seen * (1.0 - alpha[o[2], o[3]]) > 0.5
            )
            if layer.visible - lost < self.min_visible * layer.full:
                return False
        return True

    def add(self, cls: int, alpha: FloatArray, rgb: FloatImage, x0: int, y0: int) -> None:
        """Paint an object on top and update how much of each earlier one is still seen."""
        blend(self.canvas, rgb, alpha, x0, y0)
        ih, iw = self.canvas.shape[:2]
        for layer in self.layers:
            o = _overlap(
                layer.x0,
                layer.y0,
                layer.vis.shape[0],
                layer.vis.shape[1],
                x0,
                y0,
                alpha.shape[0],
                alpha.shape[1],
                ih,
                iw,
            )
            if o is None:
                continue
            before = np.count_nonzero(layer.vis[o[0], o[1]] > 0.5)
            layer.vis[o[0], o[1]] *= 1.0 - alpha[o[2], o[3]]
            layer.visible -= before - np.count_nonzero(layer.vis[o[0], o[1]] > 0.5)
        full = int(np.count_nonzero(alpha > 0.5))
        vis = alpha.copy()
        self.layers.append(_Layer(cls, x0, y0, vis, full, self._in_image(vis, x0, y0)))

    def boxes(self, min_box: int = 1, min_visible: float | None = None) -> list[Box]:
        """Boxes of the visible pixels of each object seen enough, bottom layer first."""
        need = self.min_visible if min_visible is None else min_visible
        ih, iw = self.canvas.shape[:2]
        out: list[Box] = []
        for i, layer in enumerate(self.layers):
            if layer.full == 0 or layer.visible < need * layer.full or layer.visible == 0:
                continue
            o = _overlap(
                layer.x0, layer.y0, layer.vis.shape[0], layer.vis.shape[1], 0, 0, ih, iw, ih, iw
            )
            if o is None:
                continue
            seen = layer.vis[o[0], o[1]] > 0.5
            rows, cols = np.flatnonzero(seen.any(axis=1)), np.flatnonzero(seen.any(axis=0))
            x = layer.x0 + o[1].start + int(cols[0])
            y = layer.y0 + o[0].start + int(rows[0])
            w, h = int(cols[-1] - cols[0]) + 1, int(rows[-1] - rows[0]) + 1
            if w < min_box or h < min_box:
                continue
            out.append(Box(layer.cls, x, y, w, h, layer.visible, layer.visible / layer.full, i))
        return out


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(max(hi, lo)))))


def _centre(
    rng: np.random.Generator, scene: Scene, cfg: SceneConfig, half_w: float, half_h: float
) -> tuple[float, float]:
    """Where to put an object: inside, across the border, or next to an earlier object."""
    ih, iw = scene.canvas.shape[:2]
    r = rng.random()
    if scene.layers and r < cfg.overlap_fraction:
        other = scene.layers[int(rng.integers(len(scene.layers)))]
        oh, ow = other.vis.shape
        reach = (math.hypot(oh, ow) / 2.0 + math.hypot(half_w, half_h)) * rng.uniform(0.35, 0.8)
        a = rng.uniform(0.0, 2.0 * math.pi)
        return (
            other.x0 + ow / 2.0 + reach * math.cos(a),
            other.y0 + oh / 2.0 + reach * math.sin(a),
        )
    if r < cfg.overlap_fraction + cfg.edge_fraction:
        return float(rng.uniform(-0.3 * half_w, iw + 0.3 * half_w)), float(
            rng.uniform(-0.3 * half_h, ih + 0.3 * half_h)
        )
    return (
        float(rng.uniform(min(half_w, iw / 2), max(iw - half_w, iw / 2))),
        float(rng.uniform(min(half_h, ih / 2), max(ih - half_h, ih / 2))),
    )


def compose(rng: np.random.Generator, w: int, h: int, cfg: SceneConfig) -> Scene:
    """Background plus objects, before camera effects."""
    scene = Scene(background(rng, h, w, cfg.photo_fraction, cfg.clutter_max), cfg.min_visible)
    if rng.random() < cfg.empty_fraction:
        return scene
    count = min(cfg.max_objects, 1 + int(rng.poisson(max(cfg.mean_objects - 1.0, 0.0))))
    max_size = max(cfg.min_size * 1.5, cfg.max_size_frac * min(w, h))
    for _ in range(count):
        cls = int(rng.integers(len(CLASS_NAMES)))
        unit = unit_contours(cls, rng)
        shape = Pose(
            0.0,
            0.0,
            _log_uniform(rng, cfg.min_size, max_size),
            sample_aspect(cls, rng),
            float(rng.uniform(0.0, 360.0)),
            float(rng.uniform(-0.25, 0.25)) if rng.random() < 0.3 else 0.0,
        )
        x_min, y_min, x_max, y_max = extent(shape.apply(unit))
        for _attempt in range(8):
            cx, cy = _centre(rng, scene, cfg, (x_max - x_min) / 2.0, (y_max - y_min) / 2.0)
            pose = Pose(cx, cy, shape.size, shape.aspect, shape.angle, shape.shear)
            alpha, x0, y0 = rasterize(pose.apply(unit))
            if scene.fits(alpha, x0, y0):
                break
        else:
            continue
        paint = sample_paint(rng, mean_color(scene.canvas, x0, y0, *alpha.shape))
        if rng.random() < cfg.shadow_prob:
            cast_shadow(scene.canvas, alpha, x0, y0, rng)
        scene.add(cls, alpha, render(paint, alpha), x0, y0)
    return scene


def _ramp(h: int, w: int, angle: float) -> FloatImage:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xs - w / 2.0) * math.cos(angle) + (ys - h / 2.0) * math.sin(angle)
    return (
        t / np.float32(max(abs(math.cos(angle)) * w + abs(math.sin(angle)) * h, 1.0) * 2.0)
    ).astype(np.float32)


def camera_effects(canvas: FloatImage, rng: np.random.Generator, cfg: SceneConfig) -> Image:
    """Lighting (gain, colour cast, gradient or vignette, gamma), blur and sensor noise."""
    h, w = canvas.shape[:2]
    gain = rng.uniform(0.65, 1.35) * rng.uniform(0.9, 1.1, 3)
    x = canvas * gain.astype(np.float32) + np.float32(rng.uniform(-20.0, 20.0))
    r = rng.random()
    if r < 0.35:  # light falling off across the image
        x *= (1.0 + np.float32(rng.uniform(0.3, 1.1)) * _ramp(h, w, rng.uniform(0, 2 * math.pi)))[
            ..., None
        ]
    elif r < 0.5:  # vignette
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        d2 = ((xs - w / 2) / (w / 2)) ** 2 + ((ys - h / 2) / (h / 2)) ** 2
        x *= (1.0 - np.float32(rng.uniform(0.15, 0.45)) * d2 / 2.0)[..., None]
    r = rng.random()
    if r < cfg.blur_prob:
        x = cv2.GaussianBlur(x, (0, 0), float(rng.uniform(0.4, 1.8)))
    elif r < cfg.blur_prob + 0.08:  # motion blur along a random direction
        n = int(rng.integers(3, 10))
        kernel = np.zeros((n, n), np.float32)
        kernel[n // 2, :] = 1.0 / n
        rot = cv2.getRotationMatrix2D((n / 2 - 0.5, n / 2 - 0.5), float(rng.uniform(0, 180)), 1)
        line = np.asarray(cv2.warpAffine(kernel, rot, (n, n)), np.float32)
        line /= np.float32(max(float(line.sum()), 1e-6))
        x = np.asarray(cv2.filter2D(x, -1, line), np.float32)
    if rng.random() < cfg.noise_prob:
        x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(rng.uniform(2.0, 12.0))
    out = np.clip(x + 0.5, 0.0, 255.0).astype(np.uint8)
    if rng.random() < 0.5:
        gamma = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
        lut = np.clip(255.0 * (np.arange(256) / 255.0) ** gamma + 0.5, 0, 255).astype(np.uint8)
        out = cv2.LUT(out, lut)
    return out


def render_jpeg(
    rng: np.random.Generator, cfg: SceneConfig, size: tuple[int, int] | None = None
) -> tuple[bytes, int, int, list[Box]]:
    """One training image as JPEG bytes, its (width, height) and its annotations."""
    w, h = size if size is not None else cfg.sizes[int(rng.integers(len(cfg.sizes)))]
    scene = compose(rng, w, h, cfg)
    boxes = scene.boxes(cfg.min_box)
    img = camera_effects(scene.canvas, rng, cfg)
    quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - only with a broken OpenCV build
        raise RuntimeError("OpenCV could not encode a JPEG")
    return buf.tobytes(), w, h, boxes

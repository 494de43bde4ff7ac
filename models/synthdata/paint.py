"""How an object's surface looks: fill style, colours, outline and shading, and blending.

`Paint` is sampled once per object so a moving object in the clip keeps its look.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .backgrounds import FloatImage, photo_crop, random_color, value_noise

Color = tuple[float, float, float]

ALL_STYLES: tuple[str, ...] = ("solid", "gradient", "stripes", "noise", "photo")
# Styles that look the same from frame to frame at any size (the clip uses these).
STABLE_STYLES: tuple[str, ...] = ("solid", "gradient", "stripes")
_STYLE_WEIGHTS = {"solid": 0.4, "gradient": 0.25, "stripes": 0.1, "noise": 0.15, "photo": 0.1}
_MIN_CONTRAST = 70.0  # RGB distance between the main colour and the background under it


@dataclass(frozen=True)
class Paint:
    """The surface of one object."""

    style: str
    color: Color
    color2: Color
    angle: float  # radians: direction of gradients and stripes
    period: float  # stripe period in px
    edge_color: Color
    edge_width: int  # 0: no outline
    shade: float  # strength of a brightness ramp across the shape, 0..0.5
    shade_angle: float
    seed: int  # texture seed for "noise" and "photo"


def _distance(a: Color, b: Color) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))


def _contrasting(rng: np.random.Generator, bg: Color | None) -> Color:
    """A colour far enough from `bg`; after a few tries, the best one found."""
    best, best_d = random_color(rng), -1.0
    for _ in range(8):
        c = random_color(rng)
        d = _distance(c, bg) if bg is not None else _MIN_CONTRAST
        if d >= _MIN_CONTRAST:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _scaled(c: Color, k: float) -> Color:
    return (min(255.0, c[0] * k), min(255.0, c[1] * k), min(255.0, c[2] * k))


def sample_paint(
    rng: np.random.Generator, bg: Color | None, styles: tuple[str, ...] = ALL_STYLES
) -> Paint:
    """A random look for an object drawn over a background whose mean colour is `bg`."""
    weights = np.array([_STYLE_WEIGHTS[s] for s in styles])
    style = str(rng.choice(list(styles), p=weights / weights.sum()))
    color = _contrasting(rng, bg)
    if style == "gradient":
        color2 = _scaled(color, float(rng.uniform(0.4, 0.8)))
    else:
        color2 = random_color(rng) if rng.random() < 0.5 else _scaled(color, 0.5)
    edge = rng.random() < 0.35
    return Paint(
        style=style,
        color=color,
        color2=color2,
        angle=float(rng.uniform(0, math.pi)),
        period=float(rng.uniform(4, 14)),
        edge_color=random_color(rng) if rng.random() < 0.5 else _scaled(color, 0.35),
        edge_width=int(rng.integers(1, 4)) if edge else 0,
        shade=float(rng.uniform(0.0, 0.45)) if rng.random() < 0.6 else 0.0,
        shade_angle=float(rng.uniform(0, 2 * math.pi)),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


def _ramp(h: int, w: int, angle: float) -> FloatImage:
    """-1..1 across the patch along `angle`."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    c, s = math.cos(angle), math.sin(angle)
    t = (xs - (w - 1) / 2.0) * c + (ys - (h - 1) / 2.0) * s
    half = max((abs(c) * w + abs(s) * h) / 2.0, 1.0)
    return (t / np.float32(half)).astype(np.float32)


def _lerp(t: FloatImage, a: Color, b: Color) -> FloatImage:
    ca, cb = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return (ca + t[..., None] * (cb - ca)).astype(np.float32)


def render(paint: Paint, alpha: FloatImage) -> FloatImage:
    """The object's colours (BGR float 0-255) over the patch that `alpha` covers."""
    h, w = alpha.shape
    if paint.style == "solid":
        rgb = np.empty((h, w, 3), np.float32)
        rgb[:] = np.asarray(paint.color, np.float32)
    elif paint.style == "gradient":
        rgb = _lerp((_ramp(h, w, paint.angle) + 1.0) * 0.5, paint.color, paint.color2)
    elif paint.style == "stripes":
        t = _ramp(h, w, paint.angle) * np.float32(max(h, w) / 2.0 / paint.period * math.pi)
        rgb = _lerp((np.sin(t) > 0).astype(np.float32), paint.color, paint.color2)
    elif paint.style == "noise":
        noise = value_noise(np.random.default_rng(paint.seed), h, w, octaves=3, base=2)
        rgb = _lerp(noise, paint.color, paint.color2)
    else:  # "photo": a photograph tinted towards the main colour
        crop = photo_crop(np.random.default_rng(paint.seed), h, w)
        rgb = 0.45 * crop + 0.55 * np.asarray(paint.color, np.float32)
    if paint.shade > 0.0:
        rgb *= (1.0 + np.float32(paint.shade) * _ramp(h, w, paint.shade_angle))[..., None]
    if paint.edge_width > 0:
        k = 2 * paint.edge_width + 1
        inner = cv2.erode(alpha, np.ones((k, k), np.uint8))
        keep = np.clip(inner / np.maximum(alpha, 1e-3), 0.0, 1.0)[..., None]
        edge = np.asarray(paint.edge_color, np.float32)
        rgb = (keep * rgb + (1.0 - keep) * edge).astype(np.float32)
    return np.clip(rgb, 0.0, 255.0).astype(np.float32)


def window(
    x0: int, y0: int, h: int, w: int, ih: int, iw: int
) -> tuple[slice, slice, slice, slice] | None:
    """Slices (image y, image x, patch y, patch x) where a patch at (x0, y0) meets the image."""
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x0 + w, iw), min(y0 + h, ih)
    if ix0 >= ix1 or iy0 >= iy1:
        return None
    return (slice(iy0, iy1), slice(ix0, ix1), slice(iy0 - y0, iy1 - y0), slice(ix0 - x0, ix1 - x0))


def blend(canvas: FloatImage, rgb: FloatImage, alpha: FloatImage, x0: int, y0: int) -> None:
    """Alpha-blend a patch onto the canvas in place (parts outside the canvas are cut)."""
    win = window(x0, y0, alpha.shape[0], alpha.shape[1], canvas.shape[0], canvas.shape[1])
    if win is None:
        return
    ys, xs, py, px = win
    a = alpha[py, px][..., None]
    canvas[ys, xs] = canvas[ys, xs] * (1.0 - a) + rgb[py, px] * a


def cast_shadow(
    canvas: FloatImage, alpha: FloatImage, x0: int, y0: int, rng: np.random.Generator
) -> None:
    """Darken the canvas under a blurred, offset copy of `alpha` (a soft drop shadow)."""
    sigma = float(rng.uniform(1.5, 5.0))
    dx, dy = (int(v) for v in rng.integers(-6, 7, 2))
    m = math.ceil(3 * sigma)
    padded = cv2.copyMakeBorder(alpha, m, m, m, m, cv2.BORDER_CONSTANT, value=0)
    soft = cv2.GaussianBlur(padded, (0, 0), sigma) * np.float32(rng.uniform(0.25, 0.6))
    win = window(
        x0 - m + dx, y0 - m + dy, soft.shape[0], soft.shape[1], canvas.shape[0], canvas.shape[1]
    )
    if win is None:
        return
    ys, xs, py, px = win
    canvas[ys, xs] *= (1.0 - soft[py, px])[..., None]


def mean_color(canvas: FloatImage, x0: int, y0: int, h: int, w: int) -> Color | None:
    """Mean BGR colour of the canvas under a patch, or None when the patch is off-canvas."""
    win = window(x0, y0, h, w, canvas.shape[0], canvas.shape[1])
    if win is None:
        return None
    m = canvas[win[0], win[1]].reshape(-1, 3).mean(axis=0)
    return float(m[0]), float(m[1]), float(m[2])

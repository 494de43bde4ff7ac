"""Backgrounds: crops of photographs shipped inside scikit-image, generated textures, clutter.

Clutter is drawn shapes that belong to no class (lines, arcs, lumpy blobs, letters).
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np
import numpy.typing as npt

from runtimes.errors import BackendUnavailable

Image = npt.NDArray[np.uint8]
FloatImage = npt.NDArray[np.float32]

# Photographs that scikit-image ships in its wheel (no download). Left out on purpose:
# coins, cell, colorwheel, clock, retina and logo (full of, or one big, unlabelled circle,
# ring or flat shape, which would teach the model to ignore its own classes) and "cat"
# (the same photo as chelsea).
PHOTO_NAMES: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "brick",
    "grass",
    "gravel",
    "moon",
    "hubble_deep_field",
    "immunohistochemistry",
    "page",
    "text",
    "stereo_motorcycle",
)

# Letters for clutter text; O, X, T, I, C, Q and V are left out (close to ring, cross,
# triangle outlines).
_LETTERS = "ABDEFGHJKLMNPRSUWYZ"


@functools.lru_cache(maxsize=1)
def load_photos() -> tuple[Image, ...]:
    """The photographs as BGR uint8 arrays, loaded once per process."""
    try:
        from skimage import data
    except ImportError as exc:  # build-time dependency only
        raise BackendUnavailable(
            "scikit-image is needed for the synthetic backgrounds: pip install 'edge-agent[build]'"
        ) from exc
    photos: list[Image] = []
    for name in PHOTO_NAMES:
        img = getattr(data, name)()
        if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
            img = img[0]
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)
        if arr.ndim == 2:
            arr = cv2.cvtColor(arr, cv2.COLOR_GRAY2BGR)
        else:
            arr = cv2.cvtColor(np.ascontiguousarray(arr[..., :3]), cv2.COLOR_RGB2BGR)
        photos.append(np.ascontiguousarray(arr))
    return tuple(photos)


def random_color(rng: np.random.Generator, min_sat: float = 0.0) -> tuple[float, float, float]:
    """A BGR colour (0-255) from a random hue, saturation and value."""
    hsv = np.array(
        [[[rng.uniform(0, 180), rng.uniform(min_sat, 1.0) * 255, rng.uniform(0.15, 1.0) * 255]]],
        np.float32,
    )
    bgr = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)[0, 0]
    return float(bgr[0]), float(bgr[1]), float(bgr[2])


def _lerp_colors(t: FloatImage, c0: tuple[float, ...], c1: tuple[float, ...]) -> FloatImage:
    a = np.asarray(c0, np.float32)
    b = np.asarray(c1, np.float32)
    return (a + t[..., None] * (b - a)).astype(np.float32)


def _coords(h: int, w: int, angle: float) -> tuple[FloatImage, FloatImage]:
    """Pixel coordinates rotated by `angle` radians: (along, across)."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    return xs * c + ys * s, -xs * s + ys * c


def value_noise(
    rng: np.random.Generator, h: int, w: int, octaves: int = 4, base: int = 3
) -> FloatImage:
    """Smooth multi-octave noise in [0, 1]."""
    acc = np.zeros((h, w), np.float32)
    weight = 1.0
    total = 0.0
    for k in range(octaves):
        cells = base * (2**k)
        grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
        acc += weight * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        total += weight
        weight *= 0.55
    acc /= np.float32(total)
    lo, hi = float(acc.min()), float(acc.max())
    return ((acc - lo) / max(hi - lo, 1e-6)).astype(np.float32)


def texture(rng: np.random.Generator, h: int, w: int) -> FloatImage:
    """One generated texture (BGR float 0-255): noise, gradient, stripes, checkers or blobs."""
    kind = rng.choice(["noise", "color_noise", "gradient", "stripes", "checker", "blobs"])
    c0, c1 = random_color(rng), random_color(rng)
    if kind == "noise":
        return _lerp_colors(value_noise(rng, h, w, base=int(rng.integers(2, 8))), c0, c1)
    if kind == "color_noise":
        chans = [value_noise(rng, h, w, base=int(rng.integers(2, 6))) for _ in range(3)]
        lo, hi = sorted(rng.uniform(0, 255, 2))
        return (np.stack(chans, axis=-1) * np.float32(hi - lo) + np.float32(lo)).astype(np.float32)
    if kind == "gradient":
        along, _ = _coords(h, w, float(rng.uniform(0, 2 * math.pi)))
        t = (along - along.min()) / max(float(along.max() - along.min()), 1e-6)
        return _lerp_colors(t.astype(np.float32), c0, c1)
    if kind == "stripes":
        along, _ = _coords(h, w, float(rng.uniform(0, math.pi)))
        period = float(rng.uniform(6, 60))
        wave = 0.5 + 0.5 * np.sin(along * np.float32(2 * math.pi / period))
        if rng.random() < 0.5:
            wave = (wave > 0.5).astype(np.float32)
        return _lerp_colors(wave.astype(np.float32), c0, c1)
    if kind == "checker":
        u, v = _coords(h, w, float(rng.uniform(0, math.pi / 2)))
        period = float(rng.uniform(8, 64))
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
        soft = cv2.GaussianBlur(t, (0, 0), float(rng.uniform(0.3, 1.5)))
        return _lerp_colors(np.asarray(soft, np.float32), c0, c1)
    noise = value_noise(rng, h, w, octaves=3, base=int(rng.integers(4, 12)))
    soft = cv2.GaussianBlur((noise > 0.5).astype(np.float32), (0, 0), 1.0)
    return _lerp_colors(np.asarray(soft, np.float32), c0, c1)


def photo_crop(rng: np.random.Generator, h: int, w: int) -> FloatImage:
    """A random crop of a random photograph, flipped, rescaled and recoloured."""
    photos = load_photos()
    src = photos[int(rng.integers(len(photos)))]
    sh, sw = src.shape[:2]
    target = w / h
    frac = float(rng.uniform(0.2, 1.0))  # share of the photo's area that the crop takes
    ch_f = math.sqrt(frac * sh * sw / target)
    k = min(1.0, sh / ch_f, sw / (ch_f * target))
    ch = max(8, min(sh, round(ch_f * k)))
    cw = max(8, min(sw, round(ch_f * k * target)))
    x = int(rng.integers(0, sw - cw + 1))
    y = int(rng.integers(0, sh - ch + 1))
    crop = src[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    out = cv2.resize(np.ascontiguousarray(crop), (w, h), interpolation=cv2.INTER_LINEAR)
    r = rng.random()
    if r < 0.25:  # hue rotation
        hsv = cv2.cvtColor(out, cv2.COLOR_BGR2HSV)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(rng.integers(0, 180))) % 180).astype(
            np.uint8
        )
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    elif r < 0.4:  # grey, then tinted
        grey = cv2.cvtColor(out, cv2.COLOR_BGR2GRAY).astype(np.float32) / 255.0
        return _lerp_colors(grey, (0.0, 0.0, 0.0), random_color(rng, min_sat=0.0))
    return out.astype(np.float32)


def background(
    rng: np.random.Generator, h: int, w: int, photo_fraction: float = 0.6, clutter_max: int = 6
) -> FloatImage:
    """A full background (BGR float 0-255): photo, texture, or a blend, then clutter."""
    if rng.random() < photo_fraction:
        out = photo_crop(rng, h, w)
        if rng.random() < 0.15:
            a = np.float32(rng.uniform(0.2, 0.5))
            out = (1 - a) * out + a * texture(rng, h, w)
    else:
        out = texture(rng, h, w)
        if rng.random() < 0.25:
            a = np.float32(rng.uniform(0.2, 0.5))
            out = (1 - a) * out + a * photo_crop(rng, h, w)
    out = np.ascontiguousarray(out, dtype=np.float32)
    if clutter_max > 0:
        draw_clutter(out, rng, int(rng.integers(0, clutter_max + 1)))
    return out


def _blob(rng: np.random.Generator, cx: float, cy: float, r: float) -> npt.NDArray[np.int32]:
    """A lumpy closed outline (clearly not a circle) as fixed-point points (shift 3)."""
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    radius = np.ones_like(t)
    for k in (2, 3, 4):
        radius += rng.uniform(0.1, 0.3) * np.sin(k * t + rng.uniform(0, 2 * math.pi))
    pts = np.stack([cx + r * radius * np.cos(t), cy + r * radius * np.sin(t)], axis=1)
    return np.round(pts * 8).astype(np.int32)


def draw_clutter(img: FloatImage, rng: np.random.Generator, count: int) -> None:
    """Draw `count` distractors in place: lines, polylines, arcs, lumpy blobs, letters."""
    h, w = img.shape[:2]
    side = min(h, w)
    for _ in range(count):
        color = random_color(rng)
        kind = rng.choice(["line", "polyline", "arc", "blob", "text"])
        thick = int(rng.integers(1, 5))
        if kind == "line":
            p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.line(img, p0, p1, color, thick, cv2.LINE_AA)
        elif kind == "polyline":
            n = int(rng.integers(3, 7))
            start = rng.uniform((0, 0), (w, h))
            steps = rng.normal(0, side * 0.12, (n, 2))
            pts = np.round(start + np.cumsum(steps, axis=0)).astype(np.int32)
            cv2.polylines(img, [pts], False, color, thick, cv2.LINE_AA)
        elif kind == "arc":
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            axes = (int(rng.uniform(8, side * 0.3)), int(rng.uniform(8, side * 0.3)))
            a0 = float(rng.uniform(0, 360))
            cv2.ellipse(
                img,
                centre,
                axes,
                float(rng.uniform(0, 180)),
                a0,
                a0 + float(rng.uniform(30, 200)),
                color,
                thick,
                cv2.LINE_AA,
            )
        elif kind == "blob":
            pts = _blob(
                rng,
                float(rng.uniform(0, w)),
                float(rng.uniform(0, h)),
                float(rng.uniform(6, side * 0.15)),
            )
            cv2.fillPoly(img, [pts], color, cv2.LINE_AA, 3)
        else:
            text = "".join(rng.choice(list(_LETTERS), int(rng.integers(2, 7))))
            org = (int(rng.integers(0, w)), int(rng.integers(10, h)))
            font = int(
                rng.choice(
                    [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX]
                )
            )
            mask = np.zeros((h, w), np.uint8)  # putText draws on 8-bit images only
            cv2.putText(
                mask,
                text,
                org,
                font,
                float(rng.uniform(0.4, 1.6)),
                255,
                max(1, thick - 1),
                cv2.LINE_AA,
            )
            a = mask.astype(np.float32)[..., None] * np.float32(1.0 / 255.0)
            img *= 1.0 - a
            img += a * np.asarray(color, np.float32)

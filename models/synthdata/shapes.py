"""The object classes: their ordered names, outlines in a unit box, and rasterisation.

A shape is a list of closed contours (the first filled, the rest holes) placed by `Pose`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
Points = npt.NDArray[np.float64]

# The order is the label order: category_id = index + 1 in COCO files, index in a model.
CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")

# Width / height of the unrotated shape: circles become ellipses, squares rectangles.
ASPECT_RANGE: dict[str, tuple[float, float]] = {
    "circle": (0.75, 1.33),
    "square": (0.6, 1.67),
    "triangle": (0.7, 1.4),
    "star": (0.8, 1.25),
    "cross": (0.75, 1.33),
    "ring": (0.8, 1.25),
}

_SHIFT = 3  # fixed-point bits for cv2.fillPoly: 1/8 px vertex precision
_CIRCLE_POINTS = 48


def _circle(n: int = _CIRCLE_POINTS, radius: float = 1.0) -> Points:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1) * radius


def _rounded_square(r: float) -> Points:
    """A square of side 2 whose corners are quarter circles of radius `r`."""
    if r <= 0.0:
        return np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    pts: list[Points] = []
    corners = [
        (1.0 - r, -1.0 + r, -90.0),
        (1.0 - r, 1.0 - r, 0.0),
        (-1.0 + r, 1.0 - r, 90.0),
        (-1.0 + r, -1.0 + r, 180.0),
    ]
    for cx, cy, start in corners:
        t = np.radians(np.linspace(start, start + 90.0, 7))
        pts.append(np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1))
    return np.concatenate(pts)


def _star(points: int, inner: float) -> Points:
    t = np.linspace(0.0, 2.0 * math.pi, 2 * points, endpoint=False) - math.pi / 2.0
    radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([np.cos(t) * radius, np.sin(t) * radius], axis=1)


def _cross(arm: float) -> Points:
    """A plus sign whose arms have half-width `arm` (of a half-length of 1)."""
    a = arm
    return np.array(
        [
            [-a, -1.0],
            [a, -1.0],
            [a, -a],
            [1.0, -a],
            [1.0, a],
            [a, a],
            [a, 1.0],
            [-a, 1.0],
            [-a, a],
            [-1.0, a],
            [-1.0, -a],
            [-a, -a],
        ]
    )


def _fit_unit_box(contours: list[Points]) -> list[Points]:
    """Scale and centre contours so that the outer one spans [-1, 1] on both axes."""
    outer = contours[0]
    lo, hi = outer.min(axis=0), outer.max(axis=0)
    centre, half = (lo + hi) / 2.0, np.maximum((hi - lo) / 2.0, 1e-6)
    return [(c - centre) / half for c in contours]


def unit_contours(cls: int, rng: np.random.Generator) -> list[Points]:
    """The outline of one instance of class `cls`, with its own random proportions.

    Contours span [-1, 1] on both axes; `Pose` adds size, aspect, shear and rotation.
    """
    name = CLASS_NAMES[cls]
    if name == "circle":
        contours = [_circle()]
    elif name == "square":
        contours = [_rounded_square(float(rng.uniform(0.0, 0.2)) if rng.random() < 0.3 else 0.0)]
    elif name == "triangle":
        t = np.radians(np.array([-90.0, 30.0, 150.0]))
        tri = np.stack([np.cos(t), np.sin(t)], axis=1) + rng.uniform(-0.18, 0.18, (3, 2))
        contours = [tri]
    elif name == "star":
        contours = [_star(5, float(rng.uniform(0.36, 0.55)))]
    elif name == "cross":
        contours = [_cross(float(rng.uniform(0.2, 0.38)))]
    elif name == "ring":
        contours = [_circle(), _circle(radius=float(rng.uniform(0.45, 0.72)))]
    else:  # pragma: no cover - CLASS_NAMES and this table are edited together
        raise ValueError(f"no outline for class {name!r}")
    return _fit_unit_box(contours)


def sample_aspect(cls: int, rng: np.random.Generator) -> float:
    """A width/height ratio for class `cls`, log-uniform in its range."""
    lo, hi = ASPECT_RANGE[CLASS_NAMES[cls]]
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


@dataclass(frozen=True)
class Pose:
    """Where and how a unit shape is drawn: `size` is the longest side before rotation."""

    cx: float
    cy: float
    size: float
    aspect: float = 1.0
    angle: float = 0.0  # degrees, counter-clockwise on screen
    shear: float = 0.0

    def apply(self, contours: list[Points]) -> list[Points]:
        """Image coordinates of `contours` (float, pixel centres at integers)."""
        half = self.size / 2.0
        sx, sy = (half, half / self.aspect) if self.aspect >= 1.0 else (half * self.aspect, half)
        a = math.radians(self.angle)
        c, s = math.cos(a), math.sin(a)
        scale_shear = np.array([[sx, self.shear * sy], [0.0, sy]])
        rot = np.array([[c, s], [-s, c]])
        m = rot @ scale_shear
        return [pts @ m.T + np.array([self.cx, self.cy]) for pts in contours]


def extent(contours: list[Points]) -> tuple[float, float, float, float]:
    """(x_min, y_min, x_max, y_max) of the outer contour."""
    lo, hi = contours[0].min(axis=0), contours[0].max(axis=0)
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def rasterize(contours: list[Points]) -> tuple[FloatArray, int, int]:
    """Anti-aliased coverage in [0, 1] of placed contours, as (patch, x0, y0).

    The patch covers the outer contour with a 2 px margin; it may extend past any image.
    """
    x_min, y_min, x_max, y_max = extent(contours)
    x0, y0 = math.floor(x_min) - 2, math.floor(y_min) - 2
    w, h = math.ceil(x_max) + 3 - x0, math.ceil(y_max) + 3 - y0
    mask = np.zeros((h, w), np.uint8)
    one = 1 << _SHIFT
    fixed = [np.round((c - (x0, y0)) * one).astype(np.int32) for c in contours]
    cv2.fillPoly(mask, [fixed[0]], 255, cv2.LINE_AA, _SHIFT)
    if len(fixed) > 1:
        cv2.fillPoly(mask, fixed[1:], 0, cv2.LINE_AA, _SHIFT)
    return mask.astype(np.float32) * np.float32(1.0 / 255.0), x0, y0

"""Condition maps for adapter conditioning, computed with OpenCV from a BGR image.

Each map is float32 [1, C, H, W] in 0..1 at the generated image's size, as the adapter takes it.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import numpy.typing as npt

from runtimes.errors import InputError

FloatArray = npt.NDArray[np.float32]
Image = npt.NDArray[np.uint8]


def _gray(image: Image, width: int, height: int) -> Image:
    if image.ndim == 2:
        gray = image
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        code = cv2.COLOR_BGR2GRAY if image.shape[2] == 3 else cv2.COLOR_BGRA2GRAY
        gray = np.asarray(cv2.cvtColor(image, code), np.uint8)
    else:
        raise InputError(f"condition image: expected HxW or HxWx3 pixels, got {image.shape}")
    if gray.shape != (height, width):
        interp = cv2.INTER_AREA if gray.shape[0] > height else cv2.INTER_LINEAR
        gray = np.asarray(cv2.resize(gray, (width, height), interpolation=interp), np.uint8)
    return np.asarray(gray, np.uint8)


def canny(image: Image, width: int, height: int, low: int = 60, high: int = 150) -> FloatArray:
    """Canny edges (1 channel): the map the bundled adapter is trained on."""
    edges = cv2.Canny(_gray(image, width, height), low, high)
    return (edges.astype(np.float32) * np.float32(1.0 / 255.0))[None, None]


def sobel(image: Image, width: int, height: int) -> FloatArray:
    """Gradient magnitude (1 channel), normalised to its maximum."""
    gray = _gray(image, width, height).astype(np.float32)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    mag = cv2.magnitude(gx, gy)
    peak = float(mag.max())
    return (mag / np.float32(peak if peak > 0 else 1.0))[None, None].astype(np.float32)


def gray(image: Image, width: int, height: int) -> FloatArray:
    """Plain luminance (1 channel)."""
    return (_gray(image, width, height).astype(np.float32) * np.float32(1.0 / 255.0))[None, None]


CONDITIONS: dict[str, Callable[[Image, int, int], FloatArray]] = {
    "canny": canny,
    "sobel": sobel,
    "gray": gray,
}


def condition_map(kind: str, image: Image, width: int, height: int) -> FloatArray:
    """The `kind` map of `image` at (width, height)."""
    func = CONDITIONS.get(kind)
    if func is None:
        raise InputError(f"unknown condition {kind!r}; known: {', '.join(sorted(CONDITIONS))}")
    return func(image, width, height)


def decode_image(data: bytes) -> Image:
    """JPEG/PNG/... bytes to BGR pixels; InputError when OpenCV cannot decode them."""
    if not data:
        raise InputError("condition image: no bytes")
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if pixels is None:
        raise InputError(f"condition image: {len(data)} bytes that OpenCV cannot decode")
    return np.asarray(pixels, np.uint8)

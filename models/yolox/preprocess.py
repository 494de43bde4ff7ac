"""YOLOX letterbox: resize keeping aspect, top-left placement, pad 114, BGR, written into a
preallocated model input (NCHW or NHWC; float, float16, or quantized int8/uint8).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from runtimes.errors import InputError

PAD_VALUE = 114
LEGACY_MEAN = (0.485, 0.456, 0.406)
LEGACY_STD = (0.229, 0.224, 0.225)


def leave_cores_to_the_runtime() -> None:
    """Run OpenCV's resize single-threaded, process-wide.

    The runtime's thread pool owns the cores: ONNX Runtime and XNNPACK keep their workers
    spinning after each call, and OpenCV's own pool then fights them. Measured with the ONNX
    fp32 nano on 2 cores: letterbox 2.7 ms with OpenCV's default threads, 0.54 ms with one.
    """
    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


def to_bgr(image: np.ndarray) -> np.ndarray:
    """Any 8-bit image (gray HxW or HxWx1, BGR, BGRA) as 3-channel BGR uint8."""
    if not isinstance(image, np.ndarray) or image.size == 0:
        raise InputError("image is empty or not an array")
    if image.dtype != np.uint8:
        if image.dtype == np.uint16:
            image = (image >> 8).astype(np.uint8)
        else:
            raise InputError(f"image must be uint8 (or uint16), got {image.dtype}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image.reshape(image.shape[0], image.shape[1]), cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise InputError(f"image shape {image.shape} is not HxW, HxWx1, HxWx3 or HxWx4")


def value_table(
    legacy: bool, dtype: np.dtype[Any], scale: float | None, zero_point: int | None
) -> np.ndarray:
    """Per-channel table from a BGR pixel value (0..255) to the model's input value.

    Row c is for output channel c; legacy models take RGB, so their channel 0 reads blue's
    source pixel reversed: the caller feeds channels already in the model's order.
    """
    base = np.arange(256, dtype=np.float64)
    rows = []
    for channel in range(3):
        values = base
        if legacy:
            values = (base / 255.0 - LEGACY_MEAN[channel]) / LEGACY_STD[channel]
        if scale:
            limits = np.iinfo(dtype)
            values = np.clip(np.round(values / scale) + (zero_point or 0), limits.min, limits.max)
        rows.append(values)
    return np.stack(rows, axis=1).astype(dtype).reshape(1, 256, 3)


class Letterbox:
    """Letterboxes frames into one preallocated input tensor, reused frame after frame."""

    def __init__(
        self,
        height: int,
        width: int,
        layout: str = "nchw",
        dtype: np.dtype[Any] | type = np.float32,
        legacy: bool = False,
        scale: float | None = None,
        zero_point: int | None = None,
    ) -> None:
        if layout not in ("nchw", "nhwc"):
            raise ValueError(f"layout must be nchw or nhwc, got {layout!r}")
        self.height, self.width, self.layout = height, width, layout
        self.dtype = np.dtype(dtype)
        self.legacy = legacy
        self.canvas = np.full((height, width, 3), PAD_VALUE, np.uint8)
        shape = (1, 3, height, width) if layout == "nchw" else (1, height, width, 3)
        self.input = np.empty(shape, self.dtype)
        # A plain cast does the job for float models in the official (non-legacy) mode.
        self._identity = not legacy and scale is None and self.dtype.kind == "f"
        self._table = None if self._identity else value_table(legacy, self.dtype, scale, zero_point)
        # int8 with scale 1 and zero point -128 (what full-integer converters give 0..255
        # inputs) is the pixel with its top bit flipped: one XOR instead of a table.
        self._xor_128 = (
            self._table is not None
            and self.dtype == np.int8
            and np.array_equal(
                self._table[0].astype(np.int16),
                np.repeat((np.arange(256) - 128)[:, None], 3, axis=1),
            )
        )
        self._placed: tuple[int, int] | None = None

    def _pad_all(self) -> None:
        """Fill the whole input with the padding value in the model's terms."""
        self.canvas[:] = PAD_VALUE
        if self._table is None:
            pad = np.full(3, PAD_VALUE, self.dtype)
        else:
            pad = self._table[0, PAD_VALUE, :]  # per output channel
        if self.layout == "nhwc":
            self.input[0, :, :, :] = pad
        else:
            self.input[0, :, :, :] = pad[:, None, None]

    def __call__(self, image: np.ndarray) -> float:
        """Write `image` into `self.input`; return the resize ratio (model px / image px).

        Only the image region is converted frame after frame; the padding is written once
        per placement, so letterboxed 4:3 frames cost three quarters of a square one.
        """
        bgr = to_bgr(image)
        h, w = bgr.shape[:2]
        ratio = min(self.height / h, self.width / w)
        nh, nw = max(1, min(self.height, int(h * ratio))), max(1, min(self.width, int(w * ratio)))
        if self._placed != (nh, nw):
            self._pad_all()
            self._placed = (nh, nw)
        region = self.canvas[:nh, :nw]
        if (nh, nw) == (h, w):
            region[:] = bgr
        else:
            cv2.resize(bgr, (nw, nh), dst=region, interpolation=cv2.INTER_LINEAR)
        source = region[:, :, ::-1] if self.legacy else region
        if self.layout == "nhwc":
            target = self.input[0, :nh, :nw]
            if self._table is None:
                np.copyto(target, source, casting="unsafe")
            elif self._xor_128:
                np.bitwise_xor(source, 0x80, out=target.view(np.uint8))
            else:
                target[:] = cv2.LUT(np.ascontiguousarray(source), self._table)
        else:
            target = self.input[0, :, :nh, :nw]
            if self._table is None:
                np.copyto(target, source.transpose(2, 0, 1), casting="unsafe")
            else:
                mapped = cv2.LUT(np.ascontiguousarray(source), self._table)
                np.copyto(target, mapped.transpose(2, 0, 1))
        return ratio

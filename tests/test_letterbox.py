"""Letterbox preprocessing: placement, padding, colour handling, layouts, quantized tables."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from models.yolox.preprocess import LEGACY_MEAN, LEGACY_STD, PAD_VALUE, Letterbox, to_bgr
from runtimes.errors import InputError


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def official_letterbox(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The YOLOX recipe written out plainly: a padded canvas, resize, top-left, CHW float."""
    padded = np.ones((size[0], size[1], 3), dtype=np.uint8) * 114
    r = min(size[0] / img.shape[0], size[1] / img.shape[1])
    resized = cv2.resize(
        img, (int(img.shape[1] * r), int(img.shape[0] * r)), interpolation=cv2.INTER_LINEAR
    )
    padded[: int(img.shape[0] * r), : int(img.shape[1] * r)] = resized
    return np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32)


@pytest.mark.parametrize("hw", [(480, 640), (640, 480), (416, 416), (100, 37), (300, 1200)])
def test_matches_the_official_recipe(hw: tuple[int, int]) -> None:
    img = scene(*hw)
    box = Letterbox(416, 416)
    ratio = box(img)
    assert ratio == pytest.approx(min(416 / hw[0], 416 / hw[1]))
    np.testing.assert_array_equal(box.input[0], official_letterbox(img, (416, 416)))


def test_padding_is_114_right_and_bottom_only() -> None:
    img = np.zeros((200, 400, 3), np.uint8)
    box = Letterbox(416, 416)
    box(img)
    chw = box.input[0]
    assert (chw[:, :208, :] == 0).all()  # 200 * 1.04 = 208 rows of image at the top
    assert (chw[:, 208:, :] == PAD_VALUE).all()


def test_input_buffer_is_reused_and_repadded_when_aspect_changes() -> None:
    box = Letterbox(64, 64)
    buffer = box.input
    box(np.zeros((64, 32, 3), np.uint8))
    box(np.zeros((32, 64, 3), np.uint8))
    assert box.input is buffer
    assert (box.input[0, :, 32:, :] == PAD_VALUE).all()  # no stale pixels from the tall frame
    assert (box.input[0, :, :32, :] == 0).all()


def test_grayscale_and_bgra_become_bgr() -> None:
    gray = scene(50, 80)[:, :, 0]
    assert to_bgr(gray).shape == (50, 80, 3)
    assert to_bgr(gray[:, :, None]).shape == (50, 80, 3)
    bgra = np.dstack([scene(50, 80), np.full((50, 80), 7, np.uint8)])
    np.testing.assert_array_equal(to_bgr(bgra), bgra[:, :, :3])
    box = Letterbox(32, 32)
    box(gray)
    assert np.array_equal(box.input[0, 0], box.input[0, 1])


def test_tiny_and_very_wide_images() -> None:
    box = Letterbox(416, 416)
    assert box(np.full((1, 1, 3), 9, np.uint8)) == 416.0
    assert (box.input == 9).all()
    ratio = box(np.full((2, 5000, 3), 200, np.uint8))
    assert ratio == pytest.approx(416 / 5000)
    assert (box.input[0, :, 0, :] == 200).all()  # one row kept however thin the image
    assert (box.input[0, :, 1:, :] == PAD_VALUE).all()


def test_bad_images_are_our_error() -> None:
    box = Letterbox(32, 32)
    with pytest.raises(InputError):
        box(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(InputError):
        box(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(InputError):
        box(np.zeros((10, 10, 5), np.uint8))


def test_nhwc_layout_holds_the_same_pixels() -> None:
    img = scene(300, 500)
    nchw, nhwc = Letterbox(128, 160), Letterbox(128, 160, layout="nhwc")
    nchw(img)
    nhwc(img)
    np.testing.assert_array_equal(nchw.input[0].transpose(1, 2, 0), nhwc.input[0])


def test_legacy_mode_is_rgb_normalised() -> None:
    img = scene(64, 64)
    box = Letterbox(64, 64, legacy=True)
    box(img)
    rgb = img[:, :, ::-1].astype(np.float64) / 255.0
    expected = ((rgb - LEGACY_MEAN) / LEGACY_STD).transpose(2, 0, 1)
    np.testing.assert_allclose(box.input[0], expected, atol=1e-6)


@pytest.mark.parametrize("dtype,zero", [(np.int8, -128), (np.uint8, 0)])
def test_quantized_input_uses_scale_and_zero_point(dtype: type, zero: int) -> None:
    img = scene(40, 40)
    scale = 1.0 / 255.0 * 255.0 / 254.0  # not exactly 1, so rounding matters
    box = Letterbox(40, 40, layout="nhwc", dtype=dtype, scale=scale, zero_point=zero)
    box(img)
    limits = np.iinfo(dtype)
    expected: np.ndarray = np.clip(np.round(img / scale) + zero, limits.min, limits.max).astype(
        dtype
    )
    np.testing.assert_array_equal(box.input[0], expected)

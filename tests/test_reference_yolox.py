"""Our decode + NMS against the upstream YOLOX implementation that pixeltable-yolox ships
(`YoloxHead.decode_outputs` and `yolox.utils.postprocess`), run on the raw outputs of the
real bundled models on real frames. Needs the build extra (torch, pixeltable-yolox)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.media import frames, read_image
from models.yolox.detector import YoloxDetector
from models.yolox.postprocess import postprocess
from models.zoo import SAMPLES_DIR
from tests.conftest import PACKAGES

torch = pytest.importorskip("torch", reason="the reference tests need the build extra")
pytest.importorskip("yolox", reason="the reference tests need pixeltable-yolox")

pytestmark = pytest.mark.reference


def upstream():
    """pixeltable-yolox's head and post-processing (with the NMS shim if needed)."""
    from models.scripts.yolox_arch import _ensure_torchvision

    _ensure_torchvision()
    from yolox.models.yolo_head import YoloxHead
    from yolox.utils import postprocess as upstream_postprocess

    return YoloxHead, upstream_postprocess


def sample_frames() -> list[np.ndarray]:
    stills = sorted(SAMPLES_DIR.glob("still_*.jpg"))
    images = [read_image(p) for p in stills]
    clip = SAMPLES_DIR / "demo.mp4"
    if clip.is_file():
        images += [f for i, f in frames(clip, max_frames=60) if i % 20 == 0]
    rng = np.random.default_rng(3)
    images.append(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))  # noise, 4:3
    images.append(rng.integers(0, 256, (200, 900, 3), dtype=np.uint8))  # very wide
    return images


def reference_detections(
    raw: np.ndarray,
    detector: YoloxDetector,
    conf: float,
    nms: float,
    ratio: float,
    image_hw: tuple[int, int],
) -> np.ndarray:
    YoloxHead, upstream_postprocess = upstream()
    classes = raw.shape[-1] - 5
    head = YoloxHead(classes, 0.25, strides=[8, 16, 32], in_channels=[256, 512, 1024])
    head.hw = [(detector.height // s, detector.width // s) for s in (8, 16, 32)]
    prediction = torch.from_numpy(raw.reshape(1, -1, raw.shape[-1]).copy())
    decoded = head.decode_outputs(prediction, dtype=prediction.type())
    (out,) = upstream_postprocess(decoded, classes, conf, nms, class_agnostic=False)
    if out is None:
        return np.zeros((0, 6), np.float32)
    out = out.numpy()
    boxes = out[:, :4] / ratio
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, image_hw[1])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, image_hw[0])
    return np.column_stack([boxes, out[:, 4] * out[:, 5], out[:, 6]]).astype(np.float32)


def break_ties(raw: np.ndarray) -> np.ndarray:
    """Make every objectness distinct by a hair (< 1e-3) so score order is strict.

    Dequantized int8 outputs repeat the same few values, and when two overlapping boxes
    have exactly equal scores which one NMS keeps is the implementation's choice. Both
    sides get this same array, so it still compares the two implementations. The step
    between anchors (1e-3 / anchors, ~2.8e-7 at 416 px) must stay above float32's spacing
    near 1 (6e-8): a smaller one vanished for objectness ~0.96 and left the ties in.
    """
    out = raw.copy()
    out[:, 4] += np.arange(out.shape[0], dtype=np.float32) * np.float32(1e-3 / out.shape[0])
    return out


def canonical(rows: np.ndarray) -> np.ndarray:
    """Rows (x1, y1, x2, y2, score, class) in one order that does not depend on how either
    side breaks score ties: by class, then box corners (to 0.01 px), then score."""
    keys = [np.round(rows[:, 4], 7)]
    keys += [np.round(rows[:, i], 2) for i in (3, 2, 1, 0)]
    keys.append(rows[:, 5])
    return rows[np.lexsort(keys)]


def assert_same_detections(mine: np.ndarray, theirs: np.ndarray, quantized: bool) -> None:
    """Same rows within 1e-3 px and 1e-5 in score.

    For int8 models, whose dequantized outputs make exact IoU ties at the NMS threshold
    common (OpenCV computes IoU in double, torch in float32), up to 1% of the kept boxes
    may differ; fp32 models must match exactly.
    """
    assert mine.shape == theirs.shape, f"{len(mine)} vs {len(theirs)} detections"
    if not quantized:
        a, b = canonical(mine), canonical(theirs)
        np.testing.assert_array_equal(a[:, 5], b[:, 5])
        np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-3, rtol=0)
        np.testing.assert_allclose(a[:, 4], b[:, 4], rtol=1e-5, atol=1e-7)
        return
    unmatched = 0
    for row in mine:
        same = (theirs[:, 5] == row[5]) & (np.abs(theirs[:, :4] - row[:4]).max(axis=1) <= 1e-3)
        same &= np.abs(theirs[:, 4] - row[4]) <= 1e-5 * max(1.0, float(row[4]))
        unmatched += int(not same.any())
    assert unmatched <= max(1, len(mine) // 100), f"{unmatched} of {len(mine)} boxes differ"


@pytest.mark.parametrize("key", sorted(PACKAGES), ids=lambda k: f"{k[0]}-{k[1]}")
def test_same_boxes_classes_and_scores_as_upstream(key: tuple[str, str]) -> None:
    detector = YoloxDetector.from_ref(PACKAGES[key])
    compared = 0
    for image in sample_frames():
        ratio = detector.preprocess(image)
        raw = break_ties(detector.forward())
        scores = raw[:, 4] * raw[:, 5:].max(axis=1)
        # A threshold that leaves a few hundred candidates, whatever the weights, so NMS
        # has real work; and the usual one.
        for conf in (float(np.sort(scores)[-300]), 0.25):
            hw = (image.shape[0], image.shape[1])
            ours = postprocess(
                raw,
                (detector.height, detector.width),
                ratio,
                hw,
                conf=conf,
                nms=0.45,
                max_detections=100_000,  # upstream has no cap; ours defaults to 300
                class_score_max=detector.class_score_max,
            )
            theirs = reference_detections(raw, detector, conf, 0.45, ratio, hw)
            mine = np.column_stack([ours.boxes, ours.scores, ours.class_ids.astype(np.float32)])
            assert_same_detections(mine, theirs, quantized=key[1] == "int8")
            compared += len(mine)
    assert compared > 100  # the comparison covered real detections, not empty lists


def test_reference_decode_matches_ours(tmp_path: Path) -> None:
    from models.yolox.postprocess import decode

    detector = YoloxDetector.from_ref(PACKAGES[("onnx", "fp32")])
    detector.preprocess(sample_frames()[0])
    raw = detector.forward()
    YoloxHead, _ = upstream()
    head = YoloxHead(raw.shape[-1] - 5, 0.25)
    head.hw = [(416 // s, 416 // s) for s in (8, 16, 32)]
    theirs = head.decode_outputs(torch.from_numpy(raw[None].copy()), dtype="torch.FloatTensor")
    np.testing.assert_allclose(decode(raw, 416, 416), theirs[0].numpy(), atol=1e-3, rtol=1e-6)

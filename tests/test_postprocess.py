"""YOLOX decode, score filter and class-aware NMS on hand-built head outputs."""

from __future__ import annotations

import numpy as np
import pytest

from models.yolox.postprocess import anchor_grid, decode, postprocess
from runtimes.errors import InputError

CLASSES = 4


def logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


def empty_head(height: int = 64, width: int = 64) -> np.ndarray:
    grid, _ = anchor_grid(height, width)
    head = np.zeros((grid.shape[0], 5 + CLASSES), np.float32)
    head[:, 4] = 0.01  # objectness (already a probability, as YOLOX exports it)
    head[:, 5:] = 0.01
    return head


def place(
    head: np.ndarray,
    index: int,
    dx: float,
    dy: float,
    w: float,
    h: float,
    stride: int,
    obj: float,
    cls: int,
    p: float,
) -> None:
    """Write an anchor whose decoded box is known: cx = (gx + dx) * s, w = exp(tw) * s."""
    head[index, 0], head[index, 1] = dx, dy
    head[index, 2], head[index, 3] = np.log(w / stride), np.log(h / stride)
    head[index, 4] = obj
    head[index, 5 + cls] = p


def test_anchor_counts_for_any_input_size() -> None:
    assert anchor_grid(416, 416)[0].shape == (3549, 2)
    assert anchor_grid(640, 640)[0].shape == (8400, 2)
    assert anchor_grid(256, 320)[0].shape == ((32 * 40) + (16 * 20) + (8 * 10), 2)


def test_no_detections() -> None:
    dets = postprocess(empty_head(), (64, 64), 1.0, (64, 64), conf=0.25)
    assert len(dets) == 0
    assert dets.boxes.shape == (0, 4)


def test_decode_matches_grid_formula() -> None:
    head = empty_head()
    place(head, 9, 0.5, 0.5, 16, 8, stride=8, obj=0.9, cls=2, p=0.8)  # cell (x=1, y=1)
    out = decode(head, 64, 64)
    np.testing.assert_allclose(out[9, :4], [12.0, 12.0, 16.0, 8.0], rtol=1e-6)
    dets = postprocess(head, (64, 64), 1.0, (64, 64), conf=0.25)
    assert len(dets) == 1
    np.testing.assert_allclose(dets.boxes[0], [4.0, 8.0, 20.0, 16.0], atol=1e-4)
    assert dets.class_ids[0] == 2
    assert dets.scores[0] == pytest.approx(0.9 * 0.8)


def test_every_box_overlapping_keeps_one_per_class() -> None:
    head = empty_head()
    for i in range(40):
        place(head, i, 0.5, 0.5, 30, 30, stride=8, obj=0.9, cls=i % 2, p=0.5 + i / 100)
    # All 40 boxes are near each other; shift them slightly so they overlap but differ.
    head[:40, 0] = 0.5 - (np.arange(40) % 8)  # every cx lands on the same x
    head[:40, 1] = 0.5 - (np.arange(40) // 8)
    dets = postprocess(head, (64, 64), 1.0, (64, 64), conf=0.25, nms=0.45)
    assert sorted(dets.class_ids.tolist()) == [0, 1]
    best = {c: max(0.9 * (0.5 + i / 100) for i in range(40) if i % 2 == c) for c in (0, 1)}
    for cid, score in zip(dets.class_ids, dets.scores):
        assert score == pytest.approx(best[int(cid)], rel=1e-5)


def test_class_aware_nms_keeps_overlapping_boxes_of_other_classes() -> None:
    head = empty_head()
    place(head, 9, 0.5, 0.5, 16, 16, stride=8, obj=0.9, cls=0, p=0.9)
    place(head, 10, -0.5, 0.5, 16, 16, stride=8, obj=0.9, cls=1, p=0.8)  # same box, class 1
    place(head, 11, -1.5, 0.5, 16, 16, stride=8, obj=0.9, cls=0, p=0.7)  # same box, class 0
    dets = postprocess(head, (64, 64), 1.0, (64, 64), conf=0.25, nms=0.45)
    assert dets.class_ids.tolist() == [0, 1]
    assert dets.scores.tolist() == pytest.approx([0.81, 0.72])


def test_score_is_objectness_times_class() -> None:
    head = empty_head()
    place(head, 9, 0.5, 0.5, 16, 16, stride=8, obj=0.3, cls=1, p=0.9)  # 0.27 >= 0.25
    place(head, 30, 0.5, 0.5, 16, 16, stride=8, obj=0.9, cls=1, p=0.2)  # 0.18 < 0.25
    dets = postprocess(head, (64, 64), 1.0, (64, 64), conf=0.25)
    assert len(dets) == 1
    assert dets.scores[0] == pytest.approx(0.27)


def test_boxes_map_back_through_ratio_and_are_clipped() -> None:
    head = empty_head()
    place(head, 0, 0.0, 0.0, 40, 40, stride=8, obj=0.9, cls=3, p=0.9)  # centre (0, 0)
    # The image was 128x256 letterboxed into 64x64: ratio 0.25.
    dets = postprocess(head, (64, 64), 0.25, (128, 256), conf=0.25)
    np.testing.assert_allclose(dets.boxes[0], [0.0, 0.0, 80.0, 80.0], atol=1e-4)
    place(head, 63, 0.5, 0.5, 60, 60, stride=8, obj=0.9, cls=3, p=0.95)  # near bottom-right
    dets = postprocess(head, (64, 64), 1.0, (60, 62), conf=0.25)
    assert dets.boxes[:, 2].max() <= 62 and dets.boxes[:, 3].max() <= 60


def test_non_square_input() -> None:
    grid, _ = anchor_grid(32, 96)
    head = np.zeros((grid.shape[0], 5 + CLASSES), np.float32)
    last_stride8 = 4 * 12 - 1  # the bottom-right cell of the stride-8 level
    place(head, last_stride8, 0.5, 0.5, 8, 8, stride=8, obj=0.9, cls=0, p=0.9)
    dets = postprocess(head, (32, 96), 1.0, (32, 96), conf=0.25)
    np.testing.assert_allclose(dets.boxes[0], [88.0, 24.0, 96.0, 32.0], atol=1e-4)


def test_decoded_in_graph_output() -> None:
    head = np.zeros((5, 5 + CLASSES), np.float32)
    head[2] = [50, 40, 20, 10, 0.9, 0.1, 0.8, 0.1, 0.1]
    dets = postprocess(head, (64, 64), 1.0, (100, 100), conf=0.25, decoded=True)
    np.testing.assert_allclose(dets.boxes[0], [40.0, 35.0, 60.0, 45.0])


def test_wrong_anchor_count_is_our_error() -> None:
    with pytest.raises(InputError, match="anchors"):
        postprocess(np.zeros((100, 9), np.float32), (64, 64), 1.0, (64, 64))
    with pytest.raises(InputError, match="5 \\+ classes"):
        postprocess(np.zeros((84, 5), np.float32), (64, 64), 1.0, (64, 64))

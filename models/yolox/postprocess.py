"""YOLOX head decoding (grid + strides, vectorised over every anchor), score filtering,
class-aware NMS with OpenCV, and mapping boxes back to the original image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from runtimes.errors import InputError

DEFAULT_STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class Detections:
    """Boxes in original-image pixels (x1, y1, x2, y2), scores and class ids, best first."""

    boxes: np.ndarray  # (N, 4) float32
    scores: np.ndarray  # (N,) float32
    class_ids: np.ndarray  # (N,) int32

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @staticmethod
    def empty() -> Detections:
        return Detections(
            np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int32)
        )

    def records(self, class_names: Sequence[str]) -> list[dict[str, Any]]:
        out = []
        for box, score, cid in zip(self.boxes.tolist(), self.scores.tolist(), self.class_ids):
            index = int(cid)
            out.append(
                {
                    "class_id": index,
                    "class": class_names[index] if index < len(class_names) else str(index),
                    "score": round(float(score), 5),
                    "box": [round(v, 2) for v in box],
                }
            )
        return out


@lru_cache(maxsize=16)
def anchor_grid(
    height: int, width: int, strides: tuple[int, ...] = DEFAULT_STRIDES
) -> tuple[np.ndarray, np.ndarray]:
    """(grid (N, 2) as x, y cell indices; stride (N, 1)) for an input of height x width."""
    grids, expanded = [], []
    for stride in strides:
        rows, cols = height // stride, width // stride
        ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        grids.append(np.stack((xs, ys), axis=2).reshape(-1, 2))
        expanded.append(np.full((rows * cols, 1), stride))
    grid = np.concatenate(grids).astype(np.float32)
    stride_col = np.concatenate(expanded).astype(np.float32)
    grid.setflags(write=False)
    stride_col.setflags(write=False)
    return grid, stride_col


def decode(
    raw: np.ndarray, height: int, width: int, strides: Sequence[int] = DEFAULT_STRIDES
) -> np.ndarray:
    """Decode the whole raw head output [N, 5+C] or [1, N, 5+C] into cx, cy, w, h pixels."""
    out = np.array(raw, dtype=np.float32, copy=True).reshape(-1, raw.shape[-1])
    grid, stride = anchor_grid(height, width, tuple(strides))
    if out.shape[0] != grid.shape[0]:
        raise InputError(
            f"head output has {out.shape[0]} anchors; a {height}x{width} input with strides "
            f"{list(strides)} has {grid.shape[0]}"
        )
    out[:, :2] = (out[:, :2] + grid) * stride
    out[:, 2:4] = np.exp(out[:, 2:4]) * stride
    return out


def postprocess(
    raw: np.ndarray,
    input_hw: tuple[int, int],
    ratio: float,
    image_hw: tuple[int, int],
    conf: float = 0.25,
    nms: float = 0.45,
    decoded: bool = False,
    strides: Sequence[int] = DEFAULT_STRIDES,
    max_detections: int = 300,
    class_score_max: float = 1.0,
) -> Detections:
    """Turn one image's head output into detections in original-image pixels.

    score = objectness x best class probability; anchors whose objectness alone rules them
    out are dropped before anything else is computed (class scores are at most
    `class_score_max`: 1 for sigmoids, the top of the range for dequantized int8),
    then class-aware NMS at IoU `nms`; boxes are divided by `ratio` and clipped.
    """
    pred = raw.reshape(-1, raw.shape[-1])
    if pred.shape[1] < 6:
        raise InputError(
            f"head output has {pred.shape[1]} values per anchor; YOLOX needs 5 + classes"
        )
    if not decoded:
        grid, stride = anchor_grid(input_hw[0], input_hw[1], tuple(strides))
        if pred.shape[0] != grid.shape[0]:
            raise InputError(
                f"head output has {pred.shape[0]} anchors; a {input_hw[0]}x{input_hw[1]} input "
                f"with strides {list(strides)} has {grid.shape[0]}"
            )
    # score <= objectness x the largest class score the tensor can hold (1 for sigmoids,
    # a little more for dequantized int8), so this cut never drops a passing anchor.
    candidates = np.flatnonzero(pred[:, 4] * np.float32(class_score_max) >= conf)
    if candidates.size == 0:
        return Detections.empty()
    sub = pred[candidates].astype(np.float32, copy=False)
    class_ids = sub[:, 5:].argmax(axis=1)
    scores = sub[:, 4] * sub[np.arange(sub.shape[0]), 5 + class_ids]
    keep = scores >= conf
    if not keep.any():
        return Detections.empty()
    sub, scores, class_ids, candidates = sub[keep], scores[keep], class_ids[keep], candidates[keep]
    if decoded:
        centre, size = sub[:, :2], sub[:, 2:4]
    else:
        centre = (sub[:, :2] + grid[candidates]) * stride[candidates]
        size = np.exp(sub[:, 2:4]) * stride[candidates]
    boxes = np.empty((sub.shape[0], 4), np.float32)
    boxes[:, :2] = centre - size / 2
    boxes[:, 2:] = centre + size / 2
    xywh = np.concatenate((boxes[:, :2], size), axis=1)
    nms_boxes: Any = xywh  # OpenCV's stubs want sequences; it takes arrays
    kept = cv2.dnn.NMSBoxesBatched(
        nms_boxes, scores, class_ids.astype(np.int32), -1.0, nms, top_k=max_detections
    )
    index = np.asarray(kept, dtype=np.int64).reshape(-1)
    if index.size == 0:
        return Detections.empty()
    # Order by score, then by anchor index, for a result that does not depend on NMS internals.
    index = index[np.lexsort((candidates[index], -scores[index]))][:max_detections]
    out_boxes = boxes[index] / np.float32(ratio)
    h, w = image_hw
    np.clip(out_boxes[:, 0::2], 0, w, out=out_boxes[:, 0::2])
    np.clip(out_boxes[:, 1::2], 0, h, out=out_boxes[:, 1::2])
    return Detections(
        out_boxes, scores[index].astype(np.float32), class_ids[index].astype(np.int32)
    )

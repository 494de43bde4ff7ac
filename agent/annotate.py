"""Drawing detections onto frames for `--save` and snapshots."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from models.yolox.postprocess import Detections
from models.yolox.preprocess import to_bgr


def colour(class_id: int) -> tuple[int, int, int]:
    hue = (class_id * 47) % 180
    hsv = np.array([[[hue, 200, 255]]], dtype=np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def draw(frame: np.ndarray, detections: Detections, class_names: Sequence[str]) -> np.ndarray:
    """A BGR copy of `frame` with boxes and labels."""
    canvas = to_bgr(frame).copy()
    for box, score, cid in zip(detections.boxes, detections.scores, detections.class_ids):
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        c = colour(int(cid))
        cv2.rectangle(canvas, (x1, y1), (x2, y2), c, 2)
        name = class_names[int(cid)] if int(cid) < len(class_names) else str(int(cid))
        label = f"{name} {float(score):.2f}"
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        top = max(0, y1 - th - 4)
        cv2.rectangle(canvas, (x1, top), (x1 + tw + 2, top + th + 4), c, -1)
        cv2.putText(
            canvas, label, (x1 + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1
        )
    return canvas

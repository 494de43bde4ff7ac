"""The bundled detectors really detect: held-out synthetic images through `edge-agent detect`
(COCO mAP@.5), int8 against fp32 on the demo clip, and the clip's ground truth.

Bounds sit a little under what was measured (docs/benchmarks.md, "Bundled detector
accuracy"); a retrained model that scores lower should fail here, not in the field.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

pytest.importorskip("pycocotools", reason="COCO evaluation needs the build extra")
pytest.importorskip("skimage", reason="the synthetic generator needs the build extra")
pytest.importorskip("onnxruntime", reason="needs the onnx extra")
pytest.importorskip("ai_edge_litert", reason="needs the tflite extra")

from models.scripts.eval_yolox import coco_map, coco_records
from models.synthdata import generate
from models.yolox.detector import YoloxDetector
from models.yolox.postprocess import Detections
from runtimes.base import RuntimeOptions
from tests.conftest import PACKAGES

pytestmark = pytest.mark.slow

SAMPLES = Path(__file__).resolve().parents[1] / "models" / "samples"
HELD_OUT_SEED = 2718  # train/val use seed 0, the demo clip and stills seed 1
HELD_OUT_IMAGES = 40
CLIP_FRAMES = 30
EDGE_AGENT = Path(sys.executable).parent / "edge-agent"

# Measured with the bundled "synthetic-6 v4" weights (9400 steps, still under-trained: val
# mAP@.5 0.54): held-out mAP@.5 at conf 0.01 0.636 (onnx fp32) and 0.616 (tflite int8); int8
# finds 1.000 (onnx and tflite) of the fp32 boxes; clip recall 0.71-0.74 at precision
# 0.74-0.77 (v1, 4500 steps: 0.383 / 0.344, 0.979 / 0.968, recall 0.45-0.48). These are
# regression bounds for that model: raise them with a better one.
MIN_HELD_OUT_MAP50 = {("onnx", "fp32"): 0.58, ("tflite", "int8"): 0.56}
MIN_INT8_AGREEMENT = 0.92
MIN_CLIP_RECALL = 0.65
MIN_FP32_BOXES = 120  # over the 30 frames (the clip has ~5 objects a frame; v4 sees ~4.9)
FP32_CONF = 0.3  # boxes that have to be found again
INT8_CONF = 0.2  # a box fp32 scores 0.31 and int8 0.29 is agreement, not a miss


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in `a` (N, 4) with every box in `b` (M, 4), x1y1x2y2."""
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(br - tl, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def matched(ref_boxes: np.ndarray, ref_cls: np.ndarray, boxes: np.ndarray, cls: np.ndarray) -> int:
    """How many reference boxes have a box of the same class at IoU >= 0.5 (greedy, one-to-one)."""
    if len(ref_boxes) == 0 or len(boxes) == 0:
        return 0
    iou = iou_matrix(ref_boxes, boxes)
    iou[ref_cls[:, None] != cls[None, :]] = 0.0
    found = 0
    for _ in range(min(len(ref_boxes), len(boxes))):
        r, c = np.unravel_index(np.argmax(iou), iou.shape)
        if iou[r, c] < 0.5:
            break
        found += 1
        iou[r, :] = 0.0
        iou[:, c] = 0.0
    return found


def above(det: Detections, conf: float) -> tuple[np.ndarray, np.ndarray]:
    keep = det.scores >= conf
    return det.boxes[keep], det.class_ids[keep]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("held_out")
    generate(out, {"test": HELD_OUT_IMAGES}, seed=HELD_OUT_SEED, workers=1, log=lambda _: None)
    gt = json.loads((out / "instances_test.json").read_text(encoding="utf-8"))
    return out / "test", gt


@pytest.fixture(scope="module")
def clip_frames() -> list[tuple[int, np.ndarray]]:
    """CLIP_FRAMES frames spread over the demo clip, with their indices."""
    if not (SAMPLES / "demo.mp4").exists():
        pytest.skip("demo clip not rendered")
    cap = cv2.VideoCapture(str(SAMPLES / "demo.mp4"))
    frames = []
    index = 0
    total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) or 225
    wanted = set(np.linspace(0, total - 1, CLIP_FRAMES).astype(int).tolist())
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if index in wanted:
            frames.append((index, frame))
        index += 1
    cap.release()
    assert len(frames) == CLIP_FRAMES
    return frames


@pytest.fixture(scope="module")
def clip_detections(
    clip_frames: list[tuple[int, np.ndarray]],
) -> dict[tuple[str, str], list[Detections]]:
    out = {}
    for key, directory in PACKAGES.items():
        detector = YoloxDetector.from_ref(directory, options=RuntimeOptions(threads=2), conf=0.05)
        out[key] = [detector.detect(frame) for _, frame in clip_frames]
        detector.close()
    return out


@pytest.mark.parametrize("key", sorted(MIN_HELD_OUT_MAP50), ids=lambda k: f"{k[0]}-{k[1]}")
def test_held_out_map_through_cli(
    key: tuple[str, str], held_out: tuple[Path, dict[str, Any]]
) -> None:
    images, gt = held_out
    proc = subprocess.run(
        [str(EDGE_AGENT), "detect", str(PACKAGES[key]), str(images), "--conf", "0.01",
         "--threads", "2"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ids = {img["file_name"]: img["id"] for img in gt["images"]}
    results = []
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        box = np.array([[rec["x1"], rec["y1"], rec["x2"], rec["y2"]]], np.float32)
        image_id = ids[Path(rec["input"]).name]
        results += coco_records(image_id, box, np.array([rec["score"]]), [rec["class_id"]])
    assert {Path(json.loads(line)["input"]).name for line in proc.stdout.splitlines()} <= set(ids)
    _, map50 = coco_map(gt, results)
    print(f"{key}: held-out mAP@.5 {map50:.4f} ({len(results)} detections)")
    assert map50 >= MIN_HELD_OUT_MAP50[key]


@pytest.mark.parametrize(
    "int8", [("onnx", "int8"), ("tflite", "int8")], ids=lambda k: f"{k[0]}-{k[1]}"
)
def test_int8_agrees_with_fp32(
    int8: tuple[str, str], clip_detections: dict[tuple[str, str], list[Detections]]
) -> None:
    reference = clip_detections[(int8[0], "fp32")]
    total = found = 0
    for ref, det in zip(reference, clip_detections[int8]):
        ref_boxes, ref_cls = above(ref, FP32_CONF)
        boxes, cls = above(det, INT8_CONF)
        total += len(ref_boxes)
        found += matched(ref_boxes, ref_cls, boxes, cls)
    agreement = found / max(total, 1)
    print(f"{int8} vs fp32: {found}/{total} = {agreement:.3f}")
    assert total >= MIN_FP32_BOXES
    assert agreement >= MIN_INT8_AGREEMENT


@pytest.mark.parametrize("key", sorted(PACKAGES), ids=lambda k: f"{k[0]}-{k[1]}")
def test_clip_recall_against_truth(
    key: tuple[str, str],
    clip_frames: list[tuple[int, np.ndarray]],
    clip_detections: dict[tuple[str, str], list[Detections]],
) -> None:
    truth = json.loads((SAMPLES / "demo.json").read_text(encoding="utf-8"))
    names = truth["classes"]
    total = found = predicted = 0
    for (index, _), det in zip(clip_frames, clip_detections[key]):
        objects = truth["frames"][index]
        gt_boxes = np.array([o["bbox"] for o in objects], np.float32).reshape(-1, 4)
        gt_cls = np.array([names.index(o["class"]) for o in objects], np.int32)
        boxes, cls = above(det, FP32_CONF)
        total += len(objects)
        predicted += len(boxes)
        found += matched(gt_boxes, gt_cls, boxes, cls)
    recall, precision = found / max(total, 1), found / max(predicted, 1)
    print(f"{key}: clip recall {recall:.3f} precision {precision:.3f} ({found}/{total})")
    assert recall >= MIN_CLIP_RECALL

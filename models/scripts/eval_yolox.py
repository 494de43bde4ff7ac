"""COCO evaluation (pycocotools) of the bundled YOLOX packages on the synthetic val split,
through the project's own `YoloxDetector`: the runtimes and post-processing that ship.

    .venv/bin/python -m models.scripts.eval_yolox --write-docs docs/benchmarks.md

Prints a markdown table (mAP@[.5:.95], mAP@.5, file size, median ms per frame of the full
detect path) and the command that made it; `--write-docs` puts both into the section
"Bundled detector accuracy" of that file, leaving the other sections alone.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from models.package import read_manifest
from models.yolox.detector import YoloxDetector
from models.zoo import BUNDLED_DIR
from runtimes.base import RuntimeOptions

SECTION = "## Bundled detector accuracy"
DEFAULT_PACKAGES = [
    "yolox-nano-onnx-fp32",
    "yolox-nano-onnx-int8",
    "yolox-nano-tflite-fp32",
    "yolox-nano-tflite-int8",
]


def coco_map(gt: dict[str, Any], results: list[dict[str, Any]]) -> tuple[float, float]:
    """(mAP@[.5:.95], mAP@.5) of `results` (COCO detection records) against the COCO
    ground-truth dict `gt`; pycocotools' own printing is swallowed."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = dict(gt)
        truth.createIndex()
        dets = truth.loadRes(results)
        ev = COCOeval(truth, dets, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


# Object size buckets for the breakdown: COCO box area in px^2 at the source image's scale.
SIZE_BUCKETS = {"<16px": (0, 16**2), "16-32px": (16**2, 32**2), "32-64px": (32**2, 64**2),
                ">64px": (64**2, 1e10)}  # fmt: skip


def ap50_breakdown(gt: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, float]:
    """AP@.5 per object size bucket and per class (pycocotools, the same matching as
    coco_map): where the detector fails, rather than how much."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        return {}
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = dict(gt)
        truth.createIndex()
        ev = COCOeval(truth, truth.loadRes(results), "bbox")
        ev.params.areaRng = [[0, 1e10], *(list(r) for r in SIZE_BUCKETS.values())]
        ev.params.areaRngLbl = ["all", *SIZE_BUCKETS]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # [IoU, recall, class, area, max dets]
    out: dict[str, float] = {}

    def mean(p: np.ndarray) -> float:
        valid = p[p > -1]
        return float(valid.mean()) if valid.size else float("nan")

    for a, label in enumerate(ev.params.areaRngLbl[1:], start=1):
        out[label] = mean(precision[0, :, :, a, -1])
    for k, cat in enumerate(gt["categories"]):
        out[cat["name"]] = mean(precision[0, :, k, 0, -1])
    return out


def coco_records(
    image_id: int, boxes: np.ndarray, scores: np.ndarray, class_ids: Iterable[int]
) -> list[dict[str, Any]]:
    """Detections (x1, y1, x2, y2; 0-based class ids) as COCO results (category id + 1)."""
    out = []
    for (x1, y1, x2, y2), score, cid in zip(boxes.tolist(), scores.tolist(), class_ids):
        out.append(
            {
                "image_id": image_id,
                "category_id": int(cid) + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(score),
            }
        )
    return out


def evaluate_package(
    directory: Path,
    gt: dict[str, Any],
    images: list[tuple[int, np.ndarray]],
    conf: float,
    nms: float,
    threads: int,
    timing_conf: float,
    with_breakdown: bool = False,
) -> dict[str, Any]:
    """Accuracy at `conf` over every image; the median detect() time at `timing_conf`."""
    manifest = read_manifest(directory)
    options = RuntimeOptions(threads=threads)
    detector = YoloxDetector.from_ref(directory, options=options, conf=conf, nms=nms)
    results: list[dict[str, Any]] = []
    for image_id, bgr in images:
        det = detector.detect(bgr)
        results.extend(coco_records(image_id, det.boxes, det.scores, det.class_ids))
    detector.conf = timing_conf
    for _, bgr in images[:5]:  # warm-up
        detector.detect(bgr)
    times = []
    for _, bgr in images:
        t0 = time.perf_counter()
        detector.detect(bgr)
        times.append((time.perf_counter() - t0) * 1000)
    detector.close()
    map_all, map50 = coco_map(gt, results)
    breakdown = ap50_breakdown(gt, results) if with_breakdown else {}
    model_path = directory / manifest.model
    return {
        "package": directory.name,
        "runtime": manifest.runtime,
        "precision": manifest.precision,
        "size_mb": model_path.stat().st_size / 1e6,
        "map": map_all,
        "map50": map50,
        "ms": statistics.median(times),
        "detections": len(results),
        "ap50_by": breakdown,
    }


def markdown(rows: list[dict[str, Any]], command: str, note: str) -> str:
    fp32 = {r["runtime"]: r["map"] for r in rows if r["precision"] == "fp32"}
    lines = [
        "| package | runtime | precision | file MB | mAP@[.5:.95] | mAP@.5 | Δ mAP vs fp32 "
        "| ms/frame (median) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        delta = ""
        if r["precision"] != "fp32" and r["runtime"] in fp32:
            delta = f"{100 * (r['map'] - fp32[r['runtime']]):+.1f} pt"
        lines.append(
            f"| {r['package']} | {r['runtime']} | {r['precision']} | {r['size_mb']:.2f} | "
            f"{r['map']:.3f} | {r['map50']:.3f} | {delta} | {r['ms']:.1f} |"
        )
    return "\n".join(lines) + f"\n\n{note}\n\n```sh\n{command}\n```\n"


def write_section(path: Path, body: str) -> None:
    """Replace (or append) the section `SECTION` of `path`, up to the next `## ` heading."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    block = f"{SECTION}\n\n{body}"
    if start is None:
        new = text.rstrip("\n") + "\n\n" + block
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + block + ("\n" + tail if tail else "")
    path.write_text(new, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/synth"))
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=0, help="first N images only (0: all)")
    p.add_argument(
        "--packages",
        nargs="+",
        default=DEFAULT_PACKAGES,
        help="package directories or names under models/bundled/",
    )
    p.add_argument("--conf", type=float, default=0.001, help="score threshold for COCO eval")
    p.add_argument("--nms", type=float, default=0.45)
    p.add_argument(
        "--timing-conf",
        type=float,
        default=0.25,
        help="score threshold while timing (the agent's default)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--breakdown", action="store_true", help="also AP@.5 per object size and per class"
    )
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--write-docs", type=Path, help="markdown file to put the section into")
    p.add_argument("--note", default="", help="a sentence added under the table")
    args = p.parse_args(argv)
    cv2.setNumThreads(1)

    gt = json.loads((args.data / f"instances_{args.split}.json").read_text(encoding="utf-8"))
    if args.limit:
        gt["images"] = gt["images"][: args.limit]
        ids = {img["id"] for img in gt["images"]}
        gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in ids]
    images = []
    for img in gt["images"]:
        bgr = cv2.imread(str(args.data / args.split / img["file_name"]), cv2.IMREAD_COLOR)
        if bgr is None:
            raise SystemExit(f"cannot read {args.data / args.split / img['file_name']}")
        images.append((int(img["id"]), bgr))

    rows = []
    for name in args.packages:
        directory = Path(name) if Path(name).is_dir() else BUNDLED_DIR / name
        row = evaluate_package(
            directory, gt, images, args.conf, args.nms, args.threads, args.timing_conf,
            args.breakdown,
        )  # fmt: skip
        print(
            f"{row['package']}: mAP {row['map']:.4f} mAP@.5 {row['map50']:.4f} "
            f"{row['ms']:.1f} ms/frame",
            file=sys.stderr,
            flush=True,
        )
        if row["ap50_by"]:
            parts = ", ".join(f"{k} {v:.3f}" for k, v in row["ap50_by"].items())
            print(f"{row['package']}: AP@.5 by size and class: {parts}", file=sys.stderr)
        rows.append(row)

    command = ".venv/bin/python -m models.scripts.eval_yolox " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    note = (
        f"{len(images)} images of the synthetic `{args.split}` split ({len(gt['annotations'])} "
        f"objects, 6 classes), pycocotools bbox eval through `YoloxDetector` (the shipped "
        f"letterbox, runtime and decode + NMS) at conf {args.conf}, NMS {args.nms}. ms/frame: "
        f"median of the full `detect()` (letterbox + model + post-processing) at conf "
        f"{args.timing_conf}, {args.threads} threads, on this machine's CPU "
        f"(x86_64, 2 cores, shared)."
    )
    if args.note:
        note += f"\n\n{args.note}"
    text = markdown(rows, command.strip(), note)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    if args.write_docs:
        write_section(args.write_docs, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The COCO data set writer: per-image seeds, a pool of at most two workers, progress lines.

Writes OUT/{split}/NNNNNN.jpg and OUT/instances_{split}.json (file_name is the bare name).
"""

from __future__ import annotations

import json
import multiprocessing
import re
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from runtimes.errors import EdgeAgentError

from .scene import SceneConfig, render_jpeg
from .shapes import CLASS_NAMES

GENERATOR_VERSION = "1"
_IMAGE_NAME = re.compile(r"^\d{6}\.jpg$")

Log = Callable[[str], None]
# (index, width, height, [(cls, x, y, w, h, area, visible), ...])
_Result = tuple[int, int, int, list[tuple[int, int, int, int, int, int, float]]]


class SynthDataError(EdgeAgentError):
    """The synthetic data set or clip cannot be written as asked."""


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image `index` of `split`: independent of workers and of other images."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(split.encode()), index]))


def categories() -> list[dict[str, Any]]:
    """COCO categories: ids from 1 in CLASS_NAMES order."""
    return [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASS_NAMES)]


def coco_document(
    images: list[dict[str, Any]], annotations: list[dict[str, Any]], info: dict[str, Any]
) -> dict[str, Any]:
    return {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories(),
    }


@dataclass(frozen=True)
class _Job:
    folder: str
    split: str
    seed: int
    index: int
    config: SceneConfig


def _init_worker() -> None:
    cv2.setNumThreads(1)  # the pool is the parallelism; OpenCV threads would only contend


def _render_one(job: _Job) -> _Result:
    data, w, h, boxes = render_jpeg(image_rng(job.seed, job.split, job.index), job.config)
    (Path(job.folder) / f"{job.index:06d}.jpg").write_bytes(data)
    return job.index, w, h, [(b.cls, b.x, b.y, b.w, b.h, b.area, b.visible) for b in boxes]


def _prepare(folder: Path, overwrite: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    old = [p for p in folder.iterdir() if _IMAGE_NAME.match(p.name)]
    if old and not overwrite:
        raise SynthDataError(
            f"{folder} already holds {len(old)} images; pass --overwrite to replace them"
        )
    for p in old:
        p.unlink()


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}:{s:02d}"


def write_split(
    out: Path,
    split: str,
    count: int,
    seed: int,
    config: SceneConfig,
    workers: int = 2,
    progress_every: int = 250,
    log: Log = print,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Render `count` images of one split and write its COCO file; returns run statistics."""
    folder = out / split
    _prepare(folder, overwrite)
    jobs = [_Job(str(folder), split, seed, i, config) for i in range(count)]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    start = time.perf_counter()

    def results() -> Iterator[_Result]:
        if workers <= 1:
            _init_worker()
            yield from map(_render_one, jobs)
            return
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker) as pool:
            yield from pool.imap(_render_one, jobs, chunksize=4)

    for done, (index, w, h, boxes) in enumerate(results(), start=1):
        image_id = index + 1
        images.append({"id": image_id, "file_name": f"{index:06d}.jpg", "width": w, "height": h})
        for cls, x, y, bw, bh, area, visible in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cls + 1,
                    "bbox": [float(x), float(y), float(bw), float(bh)],
                    "area": float(area),
                    "iscrowd": 0,
                    "visible": round(visible, 3),
                }
            )
        if done % progress_every == 0 or done == count:
            elapsed = time.perf_counter() - start
            rate = done / max(elapsed, 1e-9)
            log(
                f"{split:5s} {done:6d}/{count}  {rate:6.1f} img/s  "
                f"elapsed {_clock(elapsed)}  ETA {_clock((count - done) / rate)}"
            )
    info = {
        "description": "edge-agent synthetic shapes (models.synthdata)",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "split": split,
    }
    doc = coco_document(images, annotations, info)
    (out / f"instances_{split}.json").write_text(json.dumps(doc, separators=(",", ":")))
    elapsed = time.perf_counter() - start
    return {
        "split": split,
        "images": count,
        "objects": len(annotations),
        "seconds": elapsed,
        "images_per_s": count / max(elapsed, 1e-9),
    }


def generate(
    out: Path,
    counts: dict[str, int],
    seed: int,
    config: SceneConfig | None = None,
    workers: int = 2,
    progress_every: int = 250,
    log: Log = print,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Write every split in `counts` (e.g. {"train": 4000, "val": 500}) under `out`."""
    cfg = config or SceneConfig()
    out.mkdir(parents=True, exist_ok=True)
    stats = []
    for split, count in counts.items():
        if count < 0:
            raise SynthDataError(f"{split}: image count must be >= 0, got {count}")
        if count == 0:  # leave an existing split of that name alone
            continue
        s = write_split(out, split, count, seed, cfg, workers, progress_every, log, overwrite)
        log(
            f"{split}: {s['images']} images, {s['objects']} objects in {s['seconds']:.1f} s "
            f"({s['images_per_s']:.1f} img/s)"
        )
        stats.append(s)
    return stats

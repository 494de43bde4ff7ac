"""`edge-agent bench detect`: the raw runtime call against the full detect path
(letterbox + run + decode/NMS) for each model, side by side in one process.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import cv2
import numpy as np

from agent.media import frames
from models.yolox.detector import YoloxDetector
from models.zoo import SAMPLES_DIR, bundled_names, resolve
from runtimes.base import RuntimeOptions


@dataclass
class BenchRow:
    model: str
    runtime: str
    precision: str
    raw_ms: float
    pre_ms: float
    post_ms: float
    full_ms: float
    overhead: float  # (pre + post) / raw
    detections: int


def bench_frame() -> np.ndarray:
    """A 640x480 frame: the demo clip's first frame when it is bundled, else a drawn scene."""
    clip = SAMPLES_DIR / "demo.mp4"
    if clip.is_file():
        for _, frame in frames(clip, max_frames=1):
            return frame
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[:] = np.linspace(40, 200, 640, dtype=np.uint8)[None, :, None]
    cv2.circle(frame, (200, 240), 60, (0, 0, 255), -1)
    cv2.rectangle(frame, (380, 120), (520, 260), (255, 0, 0), -1)
    return frame


def median_ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1e3


def bench_model(
    reference: str, frame: np.ndarray, runs: int, warmup: int, threads: int | None
) -> BenchRow:
    ref = resolve(reference)
    detector = YoloxDetector.from_ref(ref, options=RuntimeOptions(threads=threads))
    hw = (int(frame.shape[0]), int(frame.shape[1]))
    for _ in range(warmup):
        detector.detect(frame)
    raw_t, pre_t, post_t, full_t = [], [], [], []
    count = 0
    clock = time.perf_counter
    for _ in range(runs):
        # The raw call and the full path alternate so both see the same machine state.
        t0 = clock()
        detector.runtime.run([detector.letterbox.input])
        raw_t.append(clock() - t0)
        t0 = clock()
        ratio = detector.preprocess(frame)
        t1 = clock()
        raw = detector.forward()
        t2 = clock()
        dets = detector.postprocess(raw, ratio, hw)
        t3 = clock()
        pre_t.append(t1 - t0)
        post_t.append(t3 - t2)
        full_t.append(t3 - t0)
        count = len(dets)
    detector.close()
    raw_ms = median_ms(raw_t)
    pre_ms, post_ms = median_ms(pre_t), median_ms(post_t)
    manifest = ref.manifest
    return BenchRow(
        model=reference,
        runtime=manifest.runtime if manifest else detector.runtime.backend,
        precision=manifest.precision if manifest else "?",
        raw_ms=raw_ms,
        pre_ms=pre_ms,
        post_ms=post_ms,
        full_ms=median_ms(full_t),
        overhead=(pre_ms + post_ms) / raw_ms,
        detections=count,
    )


def render(rows: list[BenchRow], runs: int, threads: int | None) -> str:
    lines = [
        f"median of {runs} runs after warm-up, threads={threads or 'default'}",
        "",
        "| model | runtime | precision | raw run ms | pre ms | post ms | full ms "
        "| (pre+post)/raw |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.runtime} | {r.precision} | {r.raw_ms:.2f} | {r.pre_ms:.3f} "
            f"| {r.post_ms:.3f} | {r.full_ms:.2f} | {r.overhead:.1%} |"
        )
    pairs = []
    for runtime in sorted({r.runtime for r in rows}):
        fp32 = [r for r in rows if r.runtime == runtime and r.precision == "fp32"]
        int8 = [r for r in rows if r.runtime == runtime and r.precision == "int8"]
        if fp32 and int8:
            pairs.append(
                f"| {runtime} | {fp32[0].raw_ms:.2f} | {int8[0].raw_ms:.2f} "
                f"| {fp32[0].raw_ms / int8[0].raw_ms:.2f}x |"
            )
    if pairs:
        lines += [
            "",
            "| runtime | fp32 raw ms | int8 raw ms | int8 speed-up |",
            "|---|---|---|---|",
        ]
        lines += pairs
    return "\n".join(lines)


def run_bench_detect(
    models: list[str],
    runs: int,
    warmup: int,
    threads: int | None,
    image: Path | None,
    as_json: bool,
    out: IO[str],
    err: IO[str],
) -> int:
    names = models or bundled_names("detection")
    if not names:
        err.write("error: no models given and no detector bundled\n")
        return 2
    frame = next(frames(image))[1] if image else bench_frame()
    rows = []
    for name in names:
        err.write(f"benchmarking {name} ...\n")
        rows.append(bench_model(name, frame, runs, warmup, threads))
    if as_json:
        out.write(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    else:
        out.write(render(rows, runs, threads) + "\n")
    return 0

"""The TFLite components of tiny-sd-tflite against the same components in ONNX Runtime, and
the whole pipeline both ways: `python bench/diffusion_tflite.py [--runs 50] [--threads 1]`.

Both pipelines are open at once and called alternately on the same inputs; medians.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.diffusion.pipeline import DiffusionPipeline, GenerateRequest
from models.zoo import BUNDLED_DIR
from runtimes.base import RuntimeOptions

FEEDS = {
    "text_encoder": ("input_ids", lambda rng: rng.integers(0, 64, (2, 16)).astype(np.int64)),
    "vae_decoder": ("latent_sample", lambda rng: rng.standard_normal((1, 4, 16, 16), np.float32)),
}


def timed(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    options = RuntimeOptions(threads=args.threads)
    onnx = DiffusionPipeline.open(BUNDLED_DIR / "tiny-sd", options)
    tfl = DiffusionPipeline.open(BUNDLED_DIR / "tiny-sd-tflite", options)
    rng = np.random.default_rng(0)
    print(f"{'component':14} {'ONNX Runtime ms':>16} {'TFLite ms':>10} {'TFLite / ORT':>13}")
    for name, (input_name, make) in FEEDS.items():
        array = make(rng)
        feeds, order = {input_name: array}, [input_name]
        calls = [functools.partial(p.components[name].run, feeds, order) for p in (onnx, tfl)]
        for call in calls:  # warm-up
            call()
        ms_a, ms_b = (timed(call, args.runs) for call in calls)
        print(f"{name:14} {ms_a:16.3f} {ms_b:10.3f} {ms_b / ms_a:12.2f}x")
    request = GenerateRequest("a red circle on a gray background", steps=20, seed=0)
    onnx.generate(request)
    tfl.generate(request)
    runs = max(3, args.runs // 10)
    ms_a = timed(lambda: onnx.generate(request), runs)
    ms_b = timed(lambda: tfl.generate(request), runs)
    print(f"{'generate 20 steps':18} {ms_a:12.1f} {ms_b:10.1f} {ms_b / ms_a:12.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""LLM serving figures on the bundled tiny Llama: single-stream tokens/s and time to first
token against onnxruntime-genai and transformers, aggregate tokens/s of 8 staggered
concurrent requests, and detection fps while generating.

    .venv/bin/python bench/llm_tokens.py [--tokens 128] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.llm.engine import Engine, EngineOptions
from models.llm.sampler import SamplingParams
from models.zoo import BUNDLED_DIR

PROMPT = "Return a new list of the items in the given sequence, sorted by"
PROMPTS = [
    PROMPT,
    "Open a file and",
    "The socket module provides",
    "Create a new thread that runs the given function and",
    "If the value is None,",
    "This class implements a FIFO queue for",
    "Raise ValueError if the",
    "Convert the string to a list of words and",
]


def engine_single(directory: Path, tokens: int, threads: int, runs: int) -> dict[str, float]:
    eng = Engine(directory, EngineOptions(threads=threads, max_batch=8))
    ids = eng.encode(PROMPT, None)
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    eng.submit(ids, params).result(120)  # warm-up
    tps, ttft = [], []
    for _ in range(runs):
        usage = eng.submit(ids, params).result(120)["usage"]
        tps.append(usage["tokens_per_s"])
        ttft.append(usage["ttft_s"])
    eng.close()
    return {"tokens_per_s": statistics.median(tps), "ttft_ms": statistics.median(ttft) * 1e3}


def alternating(
    calls: dict[str, Callable[[], dict[str, float] | None]], rounds: int
) -> dict[str, dict[str, float] | None]:
    """Each call once per round, in turn, `rounds` times; the median of each figure."""
    got: dict[str, list[dict[str, float]]] = {k: [] for k in calls}
    for _ in range(rounds):
        for key, call in calls.items():
            row = call()
            if row is not None:
                got[key].append(row)
    return {
        key: {f: statistics.median(r[f] for r in rows) for f in rows[0]} if rows else None
        for key, rows in got.items()
    }


def engine_aggregate(
    directory: Path, tokens: int, threads: int, stagger_s: float, cache_mb: float = 16.0
) -> dict[str, float]:
    """8 requests, one every `stagger_s`: all tokens over the wall time, first submit to last.

    `cache_mb` must hold all 8 requests' blocks (both arena halves) or the batch is capped
    by admission control instead of measured: the bundled model needs ~3 MB, wider ones more.
    """
    eng = Engine(directory, EngineOptions(threads=threads, max_batch=8, cache_mb=cache_mb))
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    eng.submit(eng.encode(PROMPT, None), params).result(120)
    steps0, rows0 = eng.steps, eng.batch_rows_sum
    start = time.perf_counter()
    handles = []
    for prompt in PROMPTS:
        handles.append(eng.submit(eng.encode(prompt, None), params))
        time.sleep(stagger_s)
    finals = [h.result(300) for h in handles]
    wall = time.perf_counter() - start
    mean_batch = (eng.batch_rows_sum - rows0) / max(1, eng.steps - steps0)
    eng.close()
    total = sum(f["usage"]["completion_tokens"] for f in finals)
    return {
        "tokens_per_s": total / wall,
        "mean_batch": round(mean_batch, 2),
        "ttft_ms_median": statistics.median(f["usage"]["ttft_s"] for f in finals) * 1e3,
    }


def genai_single(
    directory: Path, ids: list[int], tokens: int, threads: int, runs: int
) -> dict[str, float] | None:
    try:
        import onnxruntime_genai as og
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "m"
        shutil.copytree(directory, copy)
        cfg = json.loads((copy / "genai_config.json").read_text())
        cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
        (copy / "genai_config.json").write_text(json.dumps(cfg))
        model = og.Model(str(copy))
        tps, ttft = [], []
        for i in range(runs + 1):
            params = og.GeneratorParams(model)
            length = len(ids) + tokens
            params.set_search_options(max_length=length, min_length=length, do_sample=False)
            gen = og.Generator(model, params)
            t0 = time.perf_counter()
            gen.append_tokens(ids)
            gen.generate_next_token()
            first = time.perf_counter()
            n = 1
            while not gen.is_done():
                gen.generate_next_token()
                n += 1
            end = time.perf_counter()
            if i:  # the first run warms up
                ttft.append(first - t0)
                tps.append((n - 1) / (end - first))
            del gen
    return {"tokens_per_s": statistics.median(tps), "ttft_ms": statistics.median(ttft) * 1e3}


def transformers_single(
    ids: list[int], tokens: int, threads: int, runs: int
) -> dict[str, float] | None:
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        BUNDLED_DIR / "tiny-llama-hf", dtype=torch.float32
    ).eval()
    model.generation_config.eos_token_id = None
    x = torch.tensor([ids])
    mask = torch.ones_like(x)

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(x, attention_mask=mask, max_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0

    timed(tokens)
    ttft = statistics.median(timed(1) for _ in range(runs))
    full = statistics.median(timed(tokens) for _ in range(runs))
    return {"tokens_per_s": (tokens - 1) / (full - ttft), "ttft_ms": ttft * 1e3}


def detection_fps(
    seconds: float, llm_dir: Path | None, threads: int, nice: int, pace_fps: float = 0.0
) -> float:
    """Detector loop fps on the bundled YOLOX (ONNX int8) while the LLM serves 8 streams;
    `pace_fps` > 0 paces frames like a camera (a late frame is dropped, not queued)."""
    from agent.bench import bench_frame
    from models.yolox.detector import YoloxDetector
    from runtimes.base import RuntimeOptions

    detector = YoloxDetector.from_ref("yolox-nano-onnx-int8", options=RuntimeOptions(threads=1))
    frame = bench_frame()
    stop = threading.Event()
    eng = None
    if llm_dir is not None:
        eng = Engine(llm_dir, EngineOptions(threads=threads, nice=nice, max_batch=8))

        def feed() -> None:
            params = SamplingParams(max_tokens=200, ignore_eos=True)
            while not stop.is_set():
                hs = [eng.submit(eng.encode(p, None), params) for p in PROMPTS]
                for h in hs:
                    h.result(300)

        threading.Thread(target=feed, daemon=True).start()
        time.sleep(0.5)
    for _ in range(5):
        detector.detect(frame)
    n, t0 = 0, time.perf_counter()
    period = 1.0 / pace_fps if pace_fps else 0.0
    next_frame = t0
    while time.perf_counter() - t0 < seconds:
        if period:
            now = time.perf_counter()
            if now < next_frame:
                time.sleep(next_frame - now)
            next_frame = max(next_frame + period, time.perf_counter() - period)
        detector.detect(frame)
        n += 1
    fps = n / (time.perf_counter() - t0)
    stop.set()
    if eng is not None:
        tokens = eng.stats()["tokens_generated"]
        eng.close(30)
        print(f"  (LLM made {tokens} tokens meanwhile)", file=sys.stderr)
    detector.close()
    return fps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--stagger", type=float, default=0.0005, help="seconds between arrivals")
    ap.add_argument("--det-seconds", type=float, default=8.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out: dict[str, Any] = {"tokens": args.tokens, "threads": args.threads}
    genai_int8 = BUNDLED_DIR / "tiny-llama-genai-int8"
    probe = Engine(genai_int8)
    ids = probe.encode(PROMPT, None)
    probe.close()
    out["prompt_tokens"] = len(ids)
    # Single streams in alternating rounds (a fresh session and warm-up each), so that a
    # machine whose speed drifts treats the engine and onnxruntime-genai alike; medians.
    calls: dict[str, Callable[[], dict[str, float] | None]] = {}
    for name in ("genai-int8", "genai-fp32", "onnx-int8", "onnx-fp32"):
        calls[f"engine/{name}"] = functools.partial(
            engine_single, BUNDLED_DIR / f"tiny-llama-{name}", args.tokens, args.threads, 3
        )
    for precision in ("int8", "fp32"):
        calls[f"ort-genai/genai-{precision}"] = functools.partial(
            genai_single, BUNDLED_DIR / f"tiny-llama-genai-{precision}", ids, args.tokens,
            args.threads, 3,
        )  # fmt: skip
    out.update(alternating(calls, args.runs))
    out["transformers/fp32"] = transformers_single(ids, args.tokens, args.threads, args.runs)
    for name in ("genai-int8", "genai-fp32", "onnx-int8", "onnx-fp32"):
        out[f"engine-8-staggered/{name}"] = engine_aggregate(
            BUNDLED_DIR / f"tiny-llama-{name}", args.tokens, args.threads, args.stagger
        )
    alone = detection_fps(args.det_seconds, None, args.threads, 0)
    with_llm = detection_fps(args.det_seconds, genai_int8, args.threads, 10)
    with_llm_nice0 = detection_fps(args.det_seconds, genai_int8, args.threads, 0)
    paced_alone = detection_fps(args.det_seconds, None, args.threads, 0, 30.0)
    paced_llm = detection_fps(args.det_seconds, genai_int8, args.threads, 10, 30.0)
    out["detection_fps"] = {
        "alone": alone,
        "with_llm_nice10": with_llm,
        "with_llm_nice0": with_llm_nice0,
        "paced30_alone": paced_alone,
        "paced30_with_llm": paced_llm,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"tiny Llama, prompt {len(ids)} tokens, {args.tokens} new tokens, "
        f"{args.threads} thread(s), greedy; medians of {args.runs} runs"
    )
    print(f"{'what':32} {'tokens/s':>10} {'TTFT ms':>9}")
    for key, row in out.items():
        if isinstance(row, dict) and "ttft_ms" in row:
            print(f"{key:32} {row['tokens_per_s']:10.1f} {row['ttft_ms']:9.2f}")
    for precision in ("int8", "fp32"):
        ours, ref = out[f"engine/genai-{precision}"], out[f"ort-genai/genai-{precision}"]
        if ref:
            print(
                f"engine / onnxruntime-genai ({precision}, same file): tokens/s "
                f"{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x, TTFT "
                f"{ours['ttft_ms'] / ref['ttft_ms']:.2f}x"
            )
    hf = out["transformers/fp32"]
    if hf:
        ours = out["engine/onnx-fp32"]
        ratio = ours["tokens_per_s"] / hf["tokens_per_s"]
        print(
            f"engine / transformers (fp32): tokens/s {ratio:.2f}x"
            f", TTFT {ours['ttft_ms'] / hf['ttft_ms']:.2f}x"
        )
    for name in ("genai-int8", "genai-fp32", "onnx-int8", "onnx-fp32"):
        agg = out[f"engine-8-staggered/{name}"]
        single = out[f"engine/{name}"]["tokens_per_s"]
        print(
            f"8 staggered requests ({name}): {agg['tokens_per_s']:.1f} tokens/s aggregate = "
            f"{agg['tokens_per_s'] / single:.2f}x single stream (mean batch {agg['mean_batch']})"
        )
    det = out["detection_fps"]
    print(
        f"detection fps: alone {det['alone']:.1f}, while generating {det['with_llm_nice10']:.1f} "
        f"(nice 10: {det['with_llm_nice10'] / det['alone']:.2f}x), "
        f"{det['with_llm_nice0']:.1f} (nice 0: {det['with_llm_nice0'] / det['alone']:.2f}x)"
    )
    print(
        f"camera-paced detection (30 fps): alone {det['paced30_alone']:.1f} fps, while "
        f"generating {det['paced30_with_llm']:.1f} fps "
        f"({det['paced30_with_llm'] / det['paced30_alone']:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end pipeline fps on the demo clip against the raw runtime fps of the same model,
side by side in one process: `python bench/pipeline_fps.py [MODEL] [--seconds S]`.

The raw figure is runtime.run() in a tight loop on a prepared input; the pipeline figure is
camera thread (decoding the clip as fast as the pipeline takes frames) + letterbox + run +
NMS + event emission. The two alternate in slices; the ratio is the median over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from agent.bench import bench_frame
from agent.camera import CameraStream
from agent.pipeline import DetectionPipeline
from models.yolox.detector import YoloxDetector
from models.zoo import SAMPLES_DIR
from runtimes.base import RuntimeOptions


def _raw_slice(detector: YoloxDetector, seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        detector.runtime.run([detector.letterbox.input])
        count += 1
    return count / (time.perf_counter() - start)


def measure(
    model: str, seconds: float, threads: int | None, rounds: int
) -> tuple[float, float, float]:
    """(median raw fps, median pipeline fps, median of the per-round ratios).

    Raw and pipeline slices alternate, so both see the same machine state: while the raw
    slice runs, the bench holds the camera's lock, which parks the camera thread and the
    pipeline thread (they wait on that lock for the next frame).
    """
    stop = threading.Event()
    camera = CameraStream(str(SAMPLES_DIR / "demo.mp4"), stop, loop=True, realtime=False)
    detector = YoloxDetector.from_ref(model, options=RuntimeOptions(threads=threads))
    raw_detector = YoloxDetector.from_ref(model, options=RuntimeOptions(threads=threads))
    raw_detector.preprocess(bench_frame())
    events: list[dict[str, object]] = []
    pipe = DetectionPipeline(
        "bench", camera, detector, lambda _n, e: events.append(e), stop, event_mode="change"
    )
    camera.start()
    pipe.start()
    time.sleep(1.0)  # warm-up
    raws, pipes, ratios = [], [], []
    per = seconds / rounds
    for _ in range(rounds):
        with camera._cond:  # park both threads (see above)
            time.sleep(0.05)  # the frame in flight finishes
            raw = _raw_slice(raw_detector, per)
        time.sleep(0.1)
        first, start = pipe.frames, time.perf_counter()
        time.sleep(per)
        fps = (pipe.frames - first) / (time.perf_counter() - start)
        raws.append(raw)
        pipes.append(fps)
        ratios.append(fps / raw)
    stop.set()
    pipe.join(5)
    camera.join(5)
    detector.close()
    raw_detector.close()
    return statistics.median(raws), statistics.median(pipes), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "models", nargs="*", default=["yolox-nano-tflite-int8", "yolox-nano-onnx-fp32"]
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=6, help="alternating raw/pipeline slices")
    args = parser.parse_args()
    print("| model | raw runtime fps | pipeline fps (demo clip) | ratio |")
    print("|---|---|---|---|")
    for model in args.models:
        raw, end_to_end, ratio = measure(model, args.seconds, args.threads, args.rounds)
        print(f"| {model} | {raw:.1f} | {end_to_end:.1f} | {ratio:.1%} |", flush=True)


if __name__ == "__main__":
    main()

"""End-to-end pipeline fps on the demo clip against the raw runtime fps of the same model,
side by side in one process: `python bench/pipeline_fps.py [MODEL] [--seconds S]`.

The raw figure is runtime.run() in a tight loop on a prepared input; the pipeline figure is
camera thread (decoding the clip flat out) + letterbox + run + NMS + event emission.
"""

from __future__ import annotations

import argparse
import threading
import time

from agent.camera import CameraStream
from agent.pipeline import DetectionPipeline
from models.yolox.detector import YoloxDetector
from models.zoo import SAMPLES_DIR
from runtimes.base import RuntimeOptions


def raw_fps(model: str, seconds: float, threads: int | None) -> float:
    detector = YoloxDetector.from_ref(model, options=RuntimeOptions(threads=threads))
    detector.runtime.run([detector.letterbox.input])
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        detector.runtime.run([detector.letterbox.input])
        count += 1
    fps = count / (time.perf_counter() - start)
    detector.close()
    return fps


def pipeline_fps(model: str, seconds: float, threads: int | None) -> tuple[float, int]:
    stop = threading.Event()
    camera = CameraStream(str(SAMPLES_DIR / "demo.mp4"), stop, loop=True, realtime=False)
    detector = YoloxDetector.from_ref(model, options=RuntimeOptions(threads=threads))
    events: list[dict[str, object]] = []
    pipe = DetectionPipeline(
        "bench", camera, detector, lambda _n, e: events.append(e), stop, event_mode="change"
    )
    camera.start()
    pipe.start()
    time.sleep(1.0)  # warm-up
    first, start = pipe.frames, time.perf_counter()
    time.sleep(seconds)
    fps = (pipe.frames - first) / (time.perf_counter() - start)
    stop.set()
    pipe.join(5)
    camera.join(5)
    detector.close()
    return fps, len(events)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "models", nargs="*", default=["yolox-nano-tflite-int8", "yolox-nano-onnx-fp32"]
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    print("| model | raw runtime fps | pipeline fps (demo clip) | ratio |")
    print("|---|---|---|---|")
    for model in args.models:
        raw = raw_fps(model, args.seconds, args.threads)
        end_to_end, _ = pipeline_fps(model, args.seconds, args.threads)
        print(f"| {model} | {raw:.1f} | {end_to_end:.1f} | {end_to_end / raw:.1%} |", flush=True)


if __name__ == "__main__":
    main()

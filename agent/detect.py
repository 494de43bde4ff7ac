"""`edge-agent detect`: run a detector over images, videos and directories; JSON lines out,
optional annotated copies.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Any

import cv2

from agent.annotate import draw
from agent.media import expand, frames, is_video, video_fps
from models.yolox.detector import YoloxDetector
from runtimes.base import RuntimeOptions
from runtimes.errors import EdgeAgentError


def detection_lines(
    input_name: str, frame: int, records: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    lines = []
    for rec in records:
        x1, y1, x2, y2 = rec["box"]
        lines.append(
            {
                "input": input_name,
                "frame": frame,
                "class_id": rec["class_id"],
                "class": rec["class"],
                "score": rec["score"],
                "x1": x1,
                "y1": y1,
                "x2": x2,
                "y2": y2,
            }
        )
    return lines


def run_detect(
    model: str,
    inputs: list[str],
    conf: float,
    nms: float,
    runtime: str | None,
    threads: int | None,
    save: Path | None,
    max_frames: int | None,
    out: IO[str] = sys.stdout,
    err: IO[str] = sys.stderr,
) -> int:
    """Detect on every input; returns the exit code (1 when some input failed)."""
    detector = YoloxDetector.from_ref(
        model, runtime=runtime, options=RuntimeOptions(threads=threads), conf=conf, nms=nms
    )
    paths = expand(inputs)
    if save:
        save.mkdir(parents=True, exist_ok=True)
    failures = 0
    total_frames = total_dets = 0
    started = time.perf_counter()
    for path in paths:
        writer: cv2.VideoWriter | None = None
        try:
            for index, frame in frames(path, max_frames):
                dets = detector.detect(frame)
                total_frames += 1
                total_dets += len(dets)
                for line in detection_lines(str(path), index, dets.records(detector.class_names)):
                    out.write(json.dumps(line) + "\n")
                if save:
                    annotated = draw(frame, dets, detector.class_names)
                    if is_video(path):
                        if writer is None:
                            target = save / f"{path.stem}.annotated.mp4"
                            h, w = annotated.shape[:2]
                            fourcc = cv2.VideoWriter.fourcc(*"mp4v")
                            writer = cv2.VideoWriter(str(target), fourcc, video_fps(path), (w, h))
                        writer.write(annotated)
                    else:
                        cv2.imwrite(str(save / f"{path.stem}.annotated.jpg"), annotated)
                if is_video(path) and index and index % 100 == 0:
                    err.write(f"{path}: {index} frames\n")
        except EdgeAgentError as exc:
            failures += 1
            err.write(f"error: {exc}\n")
        finally:
            if writer is not None:
                writer.release()
    out.flush()
    elapsed = time.perf_counter() - started
    fps = total_frames / elapsed if elapsed > 0 else 0.0
    err.write(
        f"{len(paths)} input(s), {total_frames} frame(s), {total_dets} detection(s), "
        f"{fps:.1f} frames/s on {detector.runtime.backend} "
        f"({', '.join(detector.runtime.accelerators())})"
        + (f", {failures} input(s) failed" if failures else "")
        + "\n"
    )
    detector.close()
    return 1 if failures else 0

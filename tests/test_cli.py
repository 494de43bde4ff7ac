"""`edge-agent` run as a user runs it: the installed console script in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import PACKAGES

EDGE_AGENT = Path(sys.executable).parent / "edge-agent"


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(EDGE_AGENT), *map(str, args)], capture_output=True, text=True, timeout=120
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    (folder / "nested").mkdir(parents=True)
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    cv2.circle(frame, (160, 120), 50, (0, 0, 255), -1)
    cv2.imwrite(str(folder / "a.jpg"), frame)
    cv2.imwrite(str(folder / "nested" / "b.png"), cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(folder / "c.png"), cv2.cvtColor(frame, cv2.COLOR_BGR2BGRA))
    (folder / "readme.txt").write_text("not an image, and ignored in directories")
    return folder


def test_detect_directory_json_lines_and_save(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run(
        "detect",
        PACKAGES[("onnx", "fp32")],
        images,
        "--conf",
        "0.0001",
        "--save",
        out,
        "--threads",
        "1",
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines, proc.stderr
    assert {Path(d["input"]).name for d in lines} == {"a.jpg", "b.png", "c.png"}
    for d in lines:
        assert set(d) == {"input", "frame", "class_id", "class", "score", "x1", "y1", "x2", "y2"}
        assert 0 <= d["x1"] <= d["x2"] <= 320 and 0 <= d["y1"] <= d["y2"] <= 240
        assert d["score"] >= 0.0001
    assert sorted(p.name for p in out.iterdir()) == [
        "a.annotated.jpg",
        "b.annotated.jpg",
        "c.annotated.jpg",
    ]
    assert "3 input(s), 3 frame(s)" in proc.stderr


def test_detect_video_and_bundled_name(tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter.fourcc(*"mp4v"), 10, (160, 120))
    for i in range(12):
        frame = np.full((120, 160, 3), 40, np.uint8)
        cv2.rectangle(frame, (10 + i * 5, 30), (60 + i * 5, 80), (0, 255, 0), -1)
        writer.write(frame)
    writer.release()
    out = tmp_path / "saved"
    proc = run(
        "detect",
        "yolox-nano-tflite-int8",
        clip,
        "--conf",
        "0.0001",
        "--max-frames",
        "5",
        "--save",
        out,
    )
    frames_seen = {json.loads(line)["frame"] for line in proc.stdout.splitlines()}
    assert frames_seen <= set(range(5)) and frames_seen
    assert "5 frame(s)" in proc.stderr
    saved = cv2.VideoCapture(str(out / "clip.annotated.mp4"))
    count = 0
    while saved.read()[0]:
        count += 1
    saved.release()
    assert count == 5


def test_runtime_override_and_thresholds(images: Path) -> None:
    high = run("detect", PACKAGES[("tflite", "fp32")], images / "a.jpg", "--conf", "0.99")
    assert high.stdout == ""
    bad = run("detect", "yolox-nano", images / "a.jpg", "--conf", "2", check=False)
    assert bad.returncode == 2 and "between 0 and 1" in bad.stderr


def test_unreadable_input_is_reported_and_others_still_run(images: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    proc = run("detect", "yolox-nano", broken, images / "a.jpg", "--conf", "0.0001", check=False)
    assert proc.returncode == 1
    assert f"error: {broken}: not a readable image" in proc.stderr
    assert any(json.loads(line)["input"].endswith("a.jpg") for line in proc.stdout.splitlines())


def test_missing_model_and_missing_input(images: Path, tmp_path: Path) -> None:
    proc = run("detect", tmp_path / "nope.onnx", images, check=False)
    assert proc.returncode == 1
    assert "nope.onnx" in proc.stderr and "bundled" in proc.stderr
    proc = run("detect", "yolox-nano", tmp_path / "absent.jpg", check=False)
    assert proc.returncode == 1 and "absent.jpg: no such file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_corrupt_package_manifest(tmp_path: Path, images: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "model.json").write_text('{"name": "x", "task": "detection"')
    proc = run("detect", pkg, images, check=False)
    assert proc.returncode == 1 and "not valid JSON" in proc.stderr


def test_doctor_lists_runtimes_and_providers() -> None:
    report = json.loads(run("doctor", "--json").stdout)
    names = {r["name"]: r for r in report["runtimes"]}
    assert (
        names["onnx"]["version"] and "CPUExecutionProvider" in names["onnx"]["detail"]["providers"]
    )
    assert names["tflite"]["package"] in ("ai-edge-litert", "tflite-runtime")
    assert "edgetpu" in names["tflite"]["detail"]["delegates"]
    table = run("doctor").stdout
    assert "providers:" in table and "delegates:" in table


def test_bench_detect_prints_ratio() -> None:
    proc = run("bench", "detect", "yolox-nano-onnx-fp32", "--runs", "3", "--warmup", "1")
    assert "(pre+post)/raw" in proc.stdout
    assert "yolox-nano-onnx-fp32" in proc.stdout

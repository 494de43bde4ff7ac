"""The synthetic data generator: determinism, valid COCO annotations, the clip and its truth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("skimage", reason="the synthetic backgrounds need the build extra")

from models.synthdata import CLASS_NAMES, SceneConfig, SynthDataError, generate, render_clip
from models.synthdata.clip import count_frames

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "models" / "samples"
COUNTS = {"train": 6, "val": 2}


def _quiet(_line: str) -> None:
    pass


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth_a")
    generate(out, COUNTS, seed=7, workers=1, log=_quiet)
    return out


def test_same_seed_same_bytes_whatever_the_workers(dataset, tmp_path):
    generate(tmp_path, COUNTS, seed=7, workers=2, log=_quiet)
    a, b = _files(dataset), _files(tmp_path)
    assert sorted(a) == sorted(b)
    assert len([k for k in a if k.endswith(".jpg")]) == sum(COUNTS.values())
    for name in a:
        assert a[name] == b[name], name


def test_other_seed_other_images(dataset, tmp_path):
    generate(tmp_path, {"train": 2}, seed=8, workers=1, log=_quiet)
    for name in ("000000.jpg", "000001.jpg"):
        assert (tmp_path / "train" / name).read_bytes() != (dataset / "train" / name).read_bytes()
    other = json.loads((tmp_path / "instances_train.json").read_text())
    ours = json.loads((dataset / "instances_train.json").read_text())

    def first_two(doc: dict) -> list:
        return [(a["image_id"], a["bbox"]) for a in doc["annotations"] if a["image_id"] <= 2]

    assert first_two(other) != first_two(ours)


@pytest.mark.parametrize("split", sorted(COUNTS))
def test_annotations_are_valid_coco(dataset, split):
    doc = json.loads((dataset / f"instances_{split}.json").read_text())
    assert [c["id"] for c in doc["categories"]] == list(range(1, len(CLASS_NAMES) + 1))
    assert [c["name"] for c in doc["categories"]] == list(CLASS_NAMES)
    images = {im["id"]: im for im in doc["images"]}
    assert len(images) == len(doc["images"]) == COUNTS[split]
    ann_ids = [a["id"] for a in doc["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    assert doc["annotations"], "a few images should hold some objects"
    min_box = SceneConfig().min_box
    for a in doc["annotations"]:
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert 1 <= a["category_id"] <= len(CLASS_NAMES)
        assert a["iscrowd"] == 0 and a["area"] > 0
        assert w >= min_box and h >= min_box
        assert x >= 0 and y >= 0 and x + w <= im["width"] and y + h <= im["height"]
        assert a["area"] <= w * h
        assert a["visible"] >= SceneConfig().min_visible
    for im in doc["images"]:
        pixels = cv2.imread(str(dataset / split / im["file_name"]))
        assert pixels is not None
        assert pixels.shape == (im["height"], im["width"], 3)


def test_refuses_to_mix_with_an_old_data_set(dataset):
    with pytest.raises(SynthDataError, match="--overwrite"):
        generate(dataset, {"val": 1}, seed=7, workers=1, log=_quiet)


def test_clip_renders_every_frame_and_reads_back(tmp_path):
    out = tmp_path / "clip.mp4"
    info = render_clip(out, seconds=1.0, fps=10.0, size=(320, 240), seed=3)
    assert info["frames"] == 10
    assert count_frames(out) == 10
    cap = cv2.VideoCapture(str(out))
    ok, frame = cap.read()
    cap.release()
    assert ok and frame.shape == (240, 320, 3)
    truth = json.loads((tmp_path / "clip.json").read_text())
    assert truth["frame_count"] == len(truth["frames"]) == 10
    for boxes in truth["frames"]:
        for b in boxes:
            x1, y1, x2, y2 = b["bbox"]
            assert 0 <= x1 < x2 <= 320 and 0 <= y1 < y2 <= 240
            assert b["class"] in CLASS_NAMES
            assert CLASS_NAMES[b["category_id"] - 1] == b["class"]


def test_clip_is_deterministic(tmp_path):
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    render_clip(a, seconds=0.4, fps=10.0, size=(160, 120), seed=5)
    render_clip(b, seconds=0.4, fps=10.0, size=(160, 120), seed=5)
    assert (
        a.with_suffix(".json").read_text().replace("a.mp4", "b.mp4")
        == b.with_suffix(".json").read_text()
    )
    frames = []
    for path in (a, b):
        cap = cv2.VideoCapture(str(path))
        ok, f = cap.read()
        cap.release()
        assert ok
        frames.append(f)
    assert np.array_equal(frames[0], frames[1])


@pytest.mark.skipif(not (SAMPLES / "demo.mp4").exists(), reason="samples not rendered yet")
def test_committed_samples_match_their_truth():
    clip = SAMPLES / "demo.mp4"
    assert clip.stat().st_size <= 5 * 1024 * 1024
    truth = json.loads((SAMPLES / "demo.json").read_text())
    assert count_frames(clip) == truth["frame_count"] == len(truth["frames"])
    assert sum(len(f) for f in truth["frames"]) > truth["frame_count"]  # objects on screen
    stills = json.loads((SAMPLES / "stills.json").read_text())
    assert len(stills["images"]) == 4
    for im in stills["images"]:
        pixels = cv2.imread(str(SAMPLES / im["file_name"]))
        assert pixels is not None and pixels.shape == (im["height"], im["width"], 3)


def test_cli_generate(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "models.synthdata",
        "generate",
        "--out",
        str(tmp_path),
        "--train",
        "2",
        "--val",
        "1",
        "--seed",
        "1",
        "--workers",
        "1",
        "--progress-every",
        "1",
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "img/s" in run.stdout and "ETA" in run.stdout
    assert len(list((tmp_path / "train").glob("*.jpg"))) == 2
    assert (tmp_path / "instances_val.json").exists()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "--overwrite" in again.stderr

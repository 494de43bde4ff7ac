"""The pipeline layout loader, tokenizer, condition maps, request checks, `edge-agent diffuse`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.diffusion.conditions import canny, condition_map, decode_image, sobel
from models.diffusion.layout import read_layout
from models.diffusion.pipeline import DiffusionPipeline, GenerateRequest
from models.diffusion.prompt import PromptTokenizer
from models.zoo import BUNDLED_DIR
from runtimes.errors import InputError, ModelNotFound, PackageError

PACKAGE = BUNDLED_DIR / "tiny-sd"
EDGE_AGENT = Path(sys.executable).parent / "edge-agent"


@pytest.fixture(scope="module")
def pipe() -> DiffusionPipeline:
    return DiffusionPipeline.open(PACKAGE, verify=True)


def copy_without(tmp_path: Path, *parts: str) -> Path:
    root = tmp_path / "pipeline"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("diffusers", "model.json"))
    for part in parts:
        target = root / part
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return root


def test_bundled_package_is_small_and_complete() -> None:
    layout = read_layout(PACKAGE, verify=True)
    assert set(layout.models) == {"text_encoder", "unet", "vae_decoder", "adapter"}
    assert layout.manifest is not None and layout.manifest.task == "diffusion"
    total = sum(p.stat().st_size for p in PACKAGE.rglob("*") if p.is_file())
    assert total < 30e6
    assert read_layout("tiny-sd").root == BUNDLED_DIR / "tiny-sd"


def test_missing_components_are_named(tmp_path: Path) -> None:
    root = copy_without(tmp_path, "unet", "scheduler")
    with pytest.raises(PackageError) as err:
        read_layout(root)
    message = str(err.value)
    assert "unet/ (model.onnx or model.tflite)" in message
    assert "scheduler/scheduler_config.json" in message and "text_encoder/" in message
    with pytest.raises(ModelNotFound, match="no such pipeline"):
        read_layout(tmp_path / "nowhere")
    with pytest.raises(PackageError, match="not diffusion"):
        read_layout(BUNDLED_DIR / "yolox-nano-onnx-fp32")


def test_a_layout_without_manifest_or_adapter_loads(tmp_path: Path) -> None:
    """A plain optimum-style export: no model.json, no adapter."""
    root = copy_without(tmp_path, "adapter")
    pipe = DiffusionPipeline.open(root)
    try:
        assert not pipe.has_adapter
        image = pipe.generate(GenerateRequest("a blue star", steps=2)).image
        assert image.shape == (64, 64, 3)
        with pytest.raises(InputError, match="no adapter"):
            cond = np.zeros((1, 1, 64, 64), np.float32)
            pipe.generate(GenerateRequest("a blue star", steps=2, condition=cond))
    finally:
        pipe.close()


def test_tokenizer_from_vocab_and_merges_matches_tokenizer_json(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.CLIPTokenizer.from_pretrained(PACKAGE / "tokenizer")
    fast = PromptTokenizer(PACKAGE / "tokenizer")
    # Rebuild from the two files optimum exports carry (vocab.json, merges.txt).
    slow_dir = tmp_path / "tok"
    slow_dir.mkdir()
    data = json.loads((PACKAGE / "tokenizer" / "tokenizer.json").read_text())
    (slow_dir / "vocab.json").write_text(json.dumps(data["model"]["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    (slow_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    shutil.copy(PACKAGE / "tokenizer" / "tokenizer_config.json", slow_dir)
    slow = PromptTokenizer(slow_dir)
    texts = ["a red circle on a gray background", "", "A  BLUE Star, and a ring!", "x " * 40]
    want = reference(texts, padding="max_length", max_length=fast.max_length, truncation=True)
    assert fast(texts).tolist() == want.input_ids
    assert slow(texts).tolist() == want.input_ids
    with pytest.raises(PackageError, match=r"no tokenizer\.json"):
        PromptTokenizer(tmp_path)


def test_condition_maps() -> None:
    scene = np.full((120, 160, 3), 100, np.uint8)
    cv2.rectangle(scene, (40, 30), (120, 90), (255, 255, 255), -1)
    edges = canny(scene, 64, 48)
    assert edges.shape == (1, 1, 48, 64) and edges.dtype == np.float32
    assert set(np.unique(edges)) <= {0.0, 1.0} and edges.sum() > 20
    grad = sobel(scene, 64, 48)
    assert grad.max() == pytest.approx(1.0) and grad.min() == 0.0
    assert condition_map("gray", scene, 8, 8).shape == (1, 1, 8, 8)
    with pytest.raises(InputError, match="unknown condition 'depth'"):
        condition_map("depth", scene, 8, 8)
    ok, png = cv2.imencode(".png", scene)
    assert ok and decode_image(png.tobytes()).shape == (120, 160, 3)
    with pytest.raises(InputError, match="cannot decode"):
        decode_image(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InputError, match="no bytes"):
        decode_image(b"")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": 0}, "steps must be"),
        ({"width": 60}, "width must be a positive multiple of 8"),
        ({"height": 0}, "height must be"),
        ({"scheduler": "plms"}, "unknown scheduler"),
        ({"guidance": -1.0}, "guidance"),
        ({"condition": np.zeros((1, 1, 32, 32), np.float32)}, "condition must be"),
        ({"latents": np.zeros((1, 4, 8, 8), np.float32)}, "latents must be"),
    ],
)
def test_bad_requests_are_input_errors(
    pipe: DiffusionPipeline, changes: dict[str, object], message: str
) -> None:
    request = GenerateRequest(**{"prompt": "a red circle", "steps": 2, **changes})  # type: ignore[arg-type]
    with pytest.raises(InputError, match=message):
        pipe.generate(request)


def test_same_seed_same_image_and_sizes(pipe: DiffusionPipeline) -> None:
    a = pipe.generate(GenerateRequest("a green square", steps=3, seed=9)).image
    b = pipe.generate(GenerateRequest("a green square", steps=3, seed=9)).image
    c = pipe.generate(GenerateRequest("a green square", steps=3, seed=10)).image
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    wide = pipe.generate(GenerateRequest("a green square", steps=2, width=96, height=48))
    assert wide.image.shape == (48, 96, 3)


def test_cli_diffuse_writes_the_image(tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    cond = tmp_path / "cond.png"
    scene = np.full((64, 64, 3), 128, np.uint8)
    cv2.circle(scene, (32, 32), 16, (255, 255, 255), -1)
    cv2.imwrite(str(cond), scene)
    args = [str(EDGE_AGENT), "diffuse", str(PACKAGE), "a red circle", "-o", str(out)]
    done = subprocess.run(
        [*args, "--steps", "4", "--scheduler", "euler", "--condition", str(cond)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["steps"] == 4 and summary["scheduler"] == "euler"
    assert "step 4/4" in done.stderr
    image = cv2.imread(str(out))
    assert image is not None and image.shape == (64, 64, 3)
    bad = subprocess.run([*args, "--size", "60", "64"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "multiple of 8" in bad.stderr
    missing = subprocess.run(
        [*args[:2], str(tmp_path), "x", "-o", str(out)], capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 1 and "missing" in missing.stderr

"""The diffusion pipeline with TFLite components (tiny-sd-tflite: text encoder and VAE decoder
converted by models/scripts/build_diffusion_tflite.py, UNet and adapter still ONNX) against the
all-ONNX tiny-sd with the same weights, seed and scheduler."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from models.diffusion.layout import IO_MAP, read_layout
from models.diffusion.pipeline import DiffusionPipeline, GenerateRequest, StepInfo
from models.zoo import BUNDLED_DIR
from runtimes.errors import InputError, PackageError

ONNX = BUNDLED_DIR / "tiny-sd"
TFLITE = BUNDLED_DIR / "tiny-sd-tflite"


@pytest.fixture(scope="module")
def pipes() -> tuple[DiffusionPipeline, DiffusionPipeline]:
    return DiffusionPipeline.open(ONNX), DiffusionPipeline.open(TFLITE, verify=True)


def test_package_mixes_runtimes() -> None:
    layout = read_layout(TFLITE, verify=True)
    suffixes = {name: path.suffix for name, path in layout.models.items()}
    assert suffixes == {
        "text_encoder": ".tflite",
        "vae_decoder": ".tflite",
        "unet": ".onnx",
        "adapter": ".onnx",
    }
    assert layout.manifest is not None
    assert set(layout.manifest.params["tflite"]["converted"]) == {"text_encoder", "vae_decoder"}


def test_components_speak_onnx_names_and_layouts(
    pipes: tuple[DiffusionPipeline, DiffusionPipeline],
) -> None:
    onnx, tfl = pipes
    vae = tfl.components["vae_decoder"]
    assert type(vae.runtime).__name__ != type(onnx.components["vae_decoder"].runtime).__name__
    assert [i.name for i in vae.inputs] == ["latent_sample"]
    assert vae.inputs[0].shape == (1, 4, 16, 16)  # NCHW, though the file takes NHWC
    rng = np.random.default_rng(3)
    latents = rng.standard_normal((3, 4, 16, 16)).astype(np.float32)  # 3 rows: in slices of 1
    want = onnx.components["vae_decoder"].run({"latent_sample": latents}, ["latent_sample"])[0]
    got = vae.run({"latent_sample": latents}, ["latent_sample"])[0]
    assert got.shape == want.shape == (3, 3, 64, 64)
    assert float(np.abs(got - want).max()) < 1e-4


@pytest.mark.parametrize(("scheduler", "guidance"), [("ddim", 4.0), ("euler", 1.0)])
def test_same_latents_each_step_and_same_image(
    pipes: tuple[DiffusionPipeline, DiffusionPipeline], scheduler: str, guidance: float
) -> None:
    onnx, tfl = pipes
    request = GenerateRequest(
        "a red circle on a gray background", steps=6, seed=11, guidance=guidance,
        scheduler=scheduler,
    )  # fmt: skip
    steps: dict[str, list[np.ndarray]] = {"onnx": [], "tflite": []}

    def keep(key: str) -> Callable[[StepInfo], None]:
        return lambda info: steps[key].append(info.latents.copy())

    want = onnx.generate(request, keep("onnx"))
    got = tfl.generate(request, keep("tflite"))
    assert len(steps["onnx"]) == len(steps["tflite"]) == 6
    for a, b in zip(steps["onnx"], steps["tflite"]):
        assert float(np.abs(a - b).max()) < 1e-3
    diff = np.abs(want.image.astype(int) - got.image.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05


def test_other_sizes_are_refused_with_the_converted_shape(
    pipes: tuple[DiffusionPipeline, DiffusionPipeline],
) -> None:
    _, tfl = pipes
    with pytest.raises(InputError, match=r"vae_decoder/model.tflite.*expects shape \[1x16x16x4\]"):
        tfl.generate(GenerateRequest("a blue star", steps=2, width=96, height=96, guidance=1.0))


def test_bad_io_map_is_a_package_error(tmp_path: Path) -> None:
    root = tmp_path / "sd"
    shutil.copytree(TFLITE, root, ignore=shutil.ignore_patterns("model.json"))
    path = root / "vae_decoder" / IO_MAP
    mapping = json.loads(path.read_text())
    mapping["inputs"][0]["perm"] = [0, 1, 1, 2]
    path.write_text(json.dumps(mapping))
    with pytest.raises(PackageError, match=r"not a valid TFLite I/O map: latent_sample: perm"):
        DiffusionPipeline.open(root)
    mapping["inputs"][0]["perm"] = [0, 2, 3, 1]
    mapping["outputs"][0]["index"] = 5
    path.write_text(json.dumps(mapping))
    with pytest.raises(PackageError, match="output index 5 of 1"):
        DiffusionPipeline.open(root)

"""The ONNX + numpy pipeline against diffusers' torch pipelines, latents compared after every step.

Same bundled tiny pipeline (ONNX for ours, its diffusers/ weights for theirs), same initial latents,
same step noise (drawn by torch and handed to ours), same scheduler config.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.diffusion.conditions import canny
from models.diffusion.pipeline import DiffusionPipeline, GenerateRequest, StepInfo
from models.zoo import BUNDLED_DIR

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


PACKAGE = BUNDLED_DIR / "tiny-sd"
PROMPT = "a red circle on a gray background"
TOLERANCE = 1e-3
UPSTREAM = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "lcm": "LCMScheduler",
}
pytestmark = [
    pytest.mark.reference,
    # diffusers' schedulers turn torch tensors into numpy arrays the numpy-2-deprecated way.
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


def _parts(root: Path) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "vae": diffusers.AutoencoderKL.from_pretrained(root / "vae"),
            "text_encoder": transformers.CLIPTextModel.from_pretrained(root / "text_encoder"),
            "tokenizer": transformers.CLIPTokenizer.from_pretrained(root / "tokenizer"),
            "unet": diffusers.UNet2DConditionModel.from_pretrained(root / "unet"),
            "scheduler": diffusers.DDIMScheduler.from_pretrained(root / "scheduler"),
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }


@pytest.fixture(scope="module")
def theirs() -> Any:
    torch.set_num_threads(1)
    parts = _parts(PACKAGE / "diffusers")
    plain = diffusers.StableDiffusionPipeline(**parts)
    adapter = diffusers.T2IAdapter.from_pretrained(PACKAGE / "diffusers" / "adapter")
    adapted = diffusers.StableDiffusionAdapterPipeline(adapter=adapter, **parts)
    for pipe in (plain, adapted):
        pipe.set_progress_bar_config(disable=True)
    return plain, adapted


@pytest.fixture(scope="module")
def ours() -> Iterator[DiffusionPipeline]:
    pipe = DiffusionPipeline.open(PACKAGE, verify=True)
    yield pipe
    pipe.close()


def _torch_noise(seed: int) -> Any:
    from diffusers.utils.torch_utils import randn_tensor

    generator = torch.Generator().manual_seed(seed)
    return lambda shape: randn_tensor(shape, generator=generator, dtype=torch.float32).numpy()


def _compare(
    pipe: Any, ours: DiffusionPipeline, request: GenerateRequest, **extra: Any
) -> tuple[float, np.ndarray, Any]:
    seen: list[np.ndarray] = []

    def capture(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        seen.append(kwargs["latents"].detach().numpy().copy())
        return kwargs

    def capture_old(_i: int, _t: Any, latents: Any) -> None:
        seen.append(latents.detach().numpy().copy())

    if isinstance(pipe, diffusers.StableDiffusionAdapterPipeline):  # the older callback API
        extra = {**extra, "callback": capture_old, "callback_steps": 1}
    else:
        extra = {**extra, "callback_on_step_end": capture}
    scheduler_cls = getattr(diffusers, UPSTREAM[request.scheduler])
    pipe.scheduler = scheduler_cls.from_config(ours.layout.scheduler)
    with torch.no_grad():
        out = pipe(
            request.prompt,
            height=request.height,
            width=request.width,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance,
            latents=torch.from_numpy(request.latents),
            generator=torch.Generator().manual_seed(request.seed),
            output_type="latent",
            **extra,
        )
    mine: list[np.ndarray] = []
    result = ours.generate(request, lambda step: mine.append(step.latents.copy()))
    assert len(mine) == len(seen) == request.steps
    worst = max(float(np.abs(a - b).max()) for a, b in zip(mine, seen))
    return worst, result.image, out.images


def _request(scheduler: str, steps: int, **kwargs: Any) -> GenerateRequest:
    latents = np.random.default_rng(11).standard_normal((1, 4, 16, 16), dtype=np.float32)
    return GenerateRequest(
        prompt=PROMPT,
        steps=steps,
        seed=5,
        guidance=4.0,
        scheduler=scheduler,
        latents=latents,
        noise=_torch_noise(5),
        **kwargs,
    )


@pytest.mark.parametrize(
    ("scheduler", "steps"), [("ddim", 12), ("euler", 12), ("euler_a", 8), ("lcm", 4)]
)
def test_latents_match_diffusers_each_step(
    theirs: Any, ours: DiffusionPipeline, scheduler: str, steps: int
) -> None:
    worst, image, latents = _compare(theirs[0], ours, _request(scheduler, steps))
    print(f"{scheduler}: max latent difference over {steps} steps {worst:.2e}")
    assert worst < TOLERANCE
    with torch.no_grad():
        decoded = theirs[0].vae.decode(latents / theirs[0].vae.config.scaling_factor).sample
    pixels = ((decoded[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(pixels - image.astype(np.float32)).max() <= 2


def test_no_guidance_runs_one_batch_like_diffusers(theirs: Any, ours: DiffusionPipeline) -> None:
    request = _request("ddim", 6)
    request = GenerateRequest(**{**request.__dict__, "guidance": 1.0})
    worst, _image, _latents = _compare(theirs[0], ours, request)
    assert worst < TOLERANCE


def test_adapter_path_matches_diffusers_t2i_adapter(theirs: Any, ours: DiffusionPipeline) -> None:
    scene = np.full((64, 64, 3), 128, np.uint8)
    import cv2

    cv2.circle(scene, (32, 32), 18, (40, 40, 220), -1)
    condition = canny(scene, 64, 64)
    request = _request("ddim", 10, condition=condition, adapter_weight=0.8)
    worst, _image, _latents = _compare(
        theirs[1],
        ours,
        request,
        image=torch.from_numpy(condition),
        adapter_conditioning_scale=0.8,
    )
    print(f"adapter: max latent difference {worst:.2e}")
    assert worst < TOLERANCE
    plain = ours.generate(_request("ddim", 10))
    adapted = ours.generate(request)
    assert np.abs(plain.latents - adapted.latents).max() > 1e-2  # the adapter does something


def test_step_callback_sees_every_step(ours: DiffusionPipeline) -> None:
    steps: list[StepInfo] = []
    ours.generate(GenerateRequest(PROMPT, steps=3, scheduler="euler"), steps.append)
    assert [s.index for s in steps] == [0, 1, 2]
    assert all(s.unet_s > 0 and s.step_s >= s.unet_s for s in steps)

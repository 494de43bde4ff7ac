"""Text to image on any runtime: prompt → text encoder → UNet loop with a numpy scheduler → VAE.

Classifier-free guidance runs the unconditional and conditional halves in one batched UNet call;
an adapter's features (T2I-Adapter) go into the UNet's down-block residual inputs with a weight.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.diffusion.layout import Component, Layout, open_components, read_layout
from models.diffusion.prompt import PromptTokenizer
from models.diffusion.schedulers import (
    SCHEDULERS,
    FloatArray,
    NoiseFn,
    Scheduler,
    make_scheduler,
    numpy_noise,
)
from runtimes.base import RuntimeOptions
from runtimes.errors import EdgeAgentError, InputError

TEXT_INPUTS = ["input_ids"]
UNET_INPUTS = ["sample", "timestep", "encoder_hidden_states"]
VAE_INPUTS = ["latent_sample"]
ADAPTER_INPUTS = ["condition"]
RESIDUAL_PREFIX = "adapter_residual_"


class Cancelled(EdgeAgentError):
    """The step callback asked to stop."""


@dataclass(frozen=True)
class GenerateRequest:
    """What to make. `condition`: an adapter map [1, C, H, W] in 0..1 at (height, width)."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    seed: int = 0
    guidance: float = 4.0
    width: int = 64
    height: int = 64
    scheduler: str = "ddim"
    condition: FloatArray | None = None
    adapter_weight: float = 1.0
    latents: FloatArray | None = None  # initial noise (before init_noise_sigma); else from seed
    noise: NoiseFn | None = None  # noise the scheduler draws; else numpy after the latents


@dataclass(frozen=True)
class StepInfo:
    """Handed to the step callback after each step."""

    index: int
    steps: int
    timestep: float
    latents: FloatArray
    unet_s: float
    step_s: float


@dataclass
class GenerateResult:
    image: npt.NDArray[np.uint8]  # H x W x 3, RGB
    latents: FloatArray  # the final latents, before the VAE
    timings: dict[str, Any] = field(default_factory=dict)


StepCallback = Callable[[StepInfo], None]


class DiffusionPipeline:
    """A loaded pipeline: components on their runtimes, tokenizer, schedule config."""

    def __init__(self, layout: Layout, options: RuntimeOptions | None = None) -> None:
        self.layout = layout
        self.components: dict[str, Component] = open_components(layout, options or RuntimeOptions())
        text_cfg = layout.configs.get("text_encoder", {})
        ids = self.components["text_encoder"].info("input_ids")
        fixed = ids.shape[1] if ids is not None and len(ids.shape) == 2 else None
        length = fixed or layout.params.get("max_tokens") or text_cfg.get("max_position_embeddings")
        self.tokenizer = PromptTokenizer(layout.tokenizer, int(length) if length else None)
        unet_cfg, vae_cfg = layout.configs.get("unet", {}), layout.configs.get("vae_decoder", {})
        self.unet = self.components["unet"]
        sample = self.unet.info("sample") or self.unet.inputs[0]
        self.latent_channels = int(unet_cfg.get("in_channels") or sample.shape[1] or 4)
        vae_blocks = vae_cfg.get("block_out_channels")
        self.vae_factor = int(
            layout.params.get("vae_scale_factor")
            or (2 ** (len(vae_blocks) - 1) if vae_blocks else 8)
        )
        self.scaling_factor = float(
            layout.params.get("scaling_factor") or vae_cfg.get("scaling_factor") or 0.18215
        )
        unet_blocks = unet_cfg.get("block_out_channels") or [0, 0, 0, 0]
        self.size_multiple = int(
            layout.params.get("size_multiple") or self.vae_factor * 2 ** (len(unet_blocks) - 1)
        )
        size = (
            layout.params.get("image_size")
            or [self.vae_factor * int(unet_cfg.get("sample_size") or 64)] * 2
        )
        self.default_size = (int(size[0]), int(size[1]))
        self.residuals = [i for i in self.unet.inputs if i.name.startswith(RESIDUAL_PREFIX)]
        self.residuals.sort(key=lambda i: int(i.name[len(RESIDUAL_PREFIX) :]))
        self.adapter = self.components.get("adapter")
        self._zeros: dict[tuple[int, ...], FloatArray] = {}

    @classmethod
    def open(
        cls, reference: str | Path, options: RuntimeOptions | None = None, verify: bool = False
    ) -> DiffusionPipeline:
        return cls(read_layout(reference, verify=verify), options)

    @property
    def name(self) -> str:
        return self.layout.name

    @property
    def has_adapter(self) -> bool:
        return self.adapter is not None and bool(self.residuals)

    def close(self) -> None:
        for component in self.components.values():
            component.close()

    # --- parts ---------------------------------------------------------------------------

    def check(self, request: GenerateRequest) -> None:
        """InputError for anything this pipeline cannot make."""
        if request.scheduler not in SCHEDULERS:
            raise InputError(
                f"unknown scheduler {request.scheduler!r}; known: {', '.join(sorted(SCHEDULERS))}"
            )
        if not 1 <= request.steps <= 1000:
            raise InputError(f"steps must be 1..1000, got {request.steps}")
        m = self.size_multiple
        for side, value in (("width", request.width), ("height", request.height)):
            if value < m or value % m:
                raise InputError(f"{side} must be a positive multiple of {m}, got {value}")
        if not 0.0 <= request.guidance <= 50.0:
            raise InputError(f"guidance must be 0..50, got {request.guidance}")
        if request.condition is not None:
            if not self.has_adapter:
                raise InputError(f"{self.name} has no adapter: a condition cannot be used")
            want = (1, None, request.height, request.width)
            shape = request.condition.shape
            if len(shape) != 4 or shape[0] != 1 or shape[2:] != want[2:]:
                size = f"{request.height}, {request.width}"
                raise InputError(f"condition must be [1, C, {size}], got {list(shape)}")

    def encode_prompt(self, prompt: str, negative: str, guided: bool) -> FloatArray:
        """Hidden states [2, L, D] (negative first) with guidance, else [1, L, D]."""
        texts = [negative, prompt] if guided else [prompt]
        ids = self.tokenizer(texts)
        out = self.components["text_encoder"].run({"input_ids": ids}, TEXT_INPUTS)
        return np.ascontiguousarray(out[0], np.float32)

    def adapter_features(self, condition: FloatArray, weight: float) -> list[FloatArray]:
        if self.adapter is None:
            raise InputError(f"{self.name} has no adapter")
        outs = self.adapter.run({"condition": condition.astype(np.float32)}, ADAPTER_INPUTS)
        if len(outs) != len(self.residuals):
            raise InputError(
                f"{self.adapter.path}: {len(outs)} features for {len(self.residuals)} UNet inputs"
            )
        return [(o * np.float32(weight)).astype(np.float32) for o in outs]

    def _zero_residuals(self, batch: int, lat_h: int, lat_w: int) -> list[FloatArray]:
        zeros = []
        for i, info in enumerate(self.residuals):
            channels = info.shape[1] or 1
            shape = (batch, channels, max(lat_h >> i, 1), max(lat_w >> i, 1))
            if shape not in self._zeros:
                self._zeros[shape] = np.zeros(shape, np.float32)
            zeros.append(self._zeros[shape])
        return zeros

    def unet_call(
        self,
        sample: FloatArray,
        timestep: float,
        hidden: FloatArray,
        residuals: list[FloatArray] | None = None,
    ) -> FloatArray:
        """One raw UNet run (the call the benchmark compares a whole step against)."""
        batch = sample.shape[0]
        feeds: dict[str, np.ndarray] = {
            "sample": sample,
            "timestep": np.full((batch,), timestep, np.float32),
            "encoder_hidden_states": hidden,
        }
        if self.residuals:
            found = residuals or self._zero_residuals(batch, sample.shape[2], sample.shape[3])
            feeds.update({info.name: r for info, r in zip(self.residuals, found)})
        order = UNET_INPUTS + [i.name for i in self.residuals]
        ts = self.unet.info("timestep")
        if ts is not None and len(ts.shape) == 0:
            feeds["timestep"] = np.asarray(timestep, np.float32)
        return self.unet.run(feeds, order)[0]

    def decode(self, latents: FloatArray) -> npt.NDArray[np.uint8]:
        scaled = (latents / np.float32(self.scaling_factor)).astype(np.float32)
        image = self.components["vae_decoder"].run({"latent_sample": scaled}, VAE_INPUTS)[0]
        pixels = np.clip(image[0] / 2.0 + 0.5, 0.0, 1.0).transpose(1, 2, 0)
        return np.asarray((pixels * 255.0).round(), np.uint8)

    # --- the loop ------------------------------------------------------------------------

    def scheduler(self, name: str) -> Scheduler:
        return make_scheduler(name, self.layout.scheduler)

    def generate(
        self, request: GenerateRequest, callback: StepCallback | None = None
    ) -> GenerateResult:
        """Run the whole pipeline; `callback` sees each step (and may raise Cancelled)."""
        self.check(request)
        started = time.perf_counter()
        scheduler = self.scheduler(request.scheduler)
        scheduler.set_timesteps(request.steps)
        guided = request.guidance > 1.0
        t0 = time.perf_counter()
        hidden = self.encode_prompt(request.prompt, request.negative_prompt, guided)
        text_s = time.perf_counter() - t0
        lat_h, lat_w = request.height // self.vae_factor, request.width // self.vae_factor
        shape = (1, self.latent_channels, lat_h, lat_w)
        rng = numpy_noise(request.seed)
        noise = request.latents if request.latents is not None else rng(shape)
        if noise.shape != shape:
            raise InputError(f"latents must be {list(shape)}, got {list(noise.shape)}")
        draw = request.noise or rng
        latents = (noise * np.float32(scheduler.init_noise_sigma)).astype(np.float32)
        residuals = None
        adapter_s = 0.0
        if request.condition is not None:
            t0 = time.perf_counter()
            feats = self.adapter_features(request.condition, request.adapter_weight)
            batch = 2 if guided else 1
            residuals = [np.ascontiguousarray(np.repeat(f, batch, axis=0)) for f in feats]
            adapter_s = time.perf_counter() - t0
        unet_times, step_times = [], []
        g = np.float32(request.guidance)
        for index in range(request.steps):
            t_step = time.perf_counter()
            model_in = np.concatenate([latents, latents]) if guided else latents
            model_in = scheduler.scale_model_input(model_in, index)
            timestep = scheduler.model_timestep(index)
            t0 = time.perf_counter()
            pred = self.unet_call(model_in, timestep, hidden, residuals)
            unet_s = time.perf_counter() - t0
            if guided:
                uncond, cond = pred[:1], pred[1:]
                pred = uncond + g * (cond - uncond)
            latents = scheduler.step(pred.astype(np.float32), index, latents, draw)
            step_s = time.perf_counter() - t_step
            unet_times.append(unet_s)
            step_times.append(step_s)
            if callback is not None:
                callback(StepInfo(index, request.steps, timestep, latents, unet_s, step_s))
        t0 = time.perf_counter()
        image = self.decode(latents)
        vae_s = time.perf_counter() - t0
        timings = {
            "text_s": text_s,
            "adapter_s": adapter_s,
            "unet_s": unet_times,
            "step_s": step_times,
            "vae_s": vae_s,
            "total_s": time.perf_counter() - started,
        }
        return GenerateResult(image=image, latents=latents, timings=timings)

"""Diffusion schedulers in numpy: DDIM, Euler, Euler ancestral and LCM, step for step as diffusers.

Each reads the pipeline's `scheduler_config.json` (keys it lacks take its own defaults, as
diffusers' `from_config` does) and draws noise only through the `NoiseFn` it is given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from runtimes.errors import EdgeAgentError

FloatArray = npt.NDArray[np.float32]
NoiseFn = Callable[[tuple[int, ...]], FloatArray]


class SchedulerError(EdgeAgentError):
    """A scheduler name, option or step count that cannot be used."""


def betas(config: Mapping[str, Any]) -> FloatArray:
    """The training noise schedule (float32, as diffusers keeps it)."""
    n = int(config["num_train_timesteps"])
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], np.float32)
    kind = config["beta_schedule"]
    b0, b1 = float(config["beta_start"]), float(config["beta_end"])
    if kind == "linear":
        return np.linspace(b0, b1, n, dtype=np.float32)
    if kind == "scaled_linear":
        return np.linspace(b0**0.5, b1**0.5, n, dtype=np.float32) ** 2
    if kind == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        out = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return np.asarray(out, np.float32)
    raise SchedulerError(f"beta_schedule {kind!r} is not supported")


class Scheduler:
    """Common part: config with per-class defaults, alphas, the timestep spacing."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    unsupported: ClassVar[dict[str, Any]] = {"rescale_betas_zero_snr": False}
    predictions: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        given = dict(config or {})
        self.config = {k: given.get(k, v) for k, v in self.defaults.items()}
        for key, allowed in self.unsupported.items():
            if self.config.get(key, allowed) != allowed:
                raise SchedulerError(f"{self.name}: {key}={self.config[key]!r} is not supported")
        if self.config["prediction_type"] not in self.predictions:
            raise SchedulerError(
                f"{self.name}: prediction_type {self.config['prediction_type']!r} is not supported "
                f"(supported: {', '.join(self.predictions)})"
            )
        self.train_steps = int(self.config["num_train_timesteps"])
        self.alphas_cumprod = np.cumprod(1.0 - betas(self.config), dtype=np.float32)
        self.timesteps: npt.NDArray[Any] = np.zeros(0, np.float32)
        self.steps = 0

    def _spaced(self, steps: int, dtype: type) -> npt.NDArray[Any]:
        spacing, n = self.config["timestep_spacing"], self.train_steps
        if spacing == "linspace" and dtype is np.int64:
            return np.linspace(0, n - 1, steps).round()[::-1].copy().astype(np.int64)
        if spacing == "linspace":
            return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
        if spacing == "leading":
            ratio = n // steps
            out = (np.arange(0, steps) * ratio).round()[::-1].copy().astype(dtype)
            return out + dtype(self.config["steps_offset"])
        if spacing == "trailing":
            out = np.round(np.arange(n, 0, -n / steps)).astype(dtype)
            return out - dtype(1)
        raise SchedulerError(f"{self.name}: timestep_spacing {spacing!r} is not supported")

    def _check_steps(self, steps: int, most: int | None = None) -> None:
        limit = most if most is not None else self.train_steps
        if not 1 <= steps <= limit:
            raise SchedulerError(f"{self.name}: steps must be 1..{limit}, got {steps}")

    def set_timesteps(self, steps: int) -> None:
        raise NotImplementedError

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def model_timestep(self, index: int) -> float:
        """The timestep value the UNet gets at step `index`."""
        return float(self.timesteps[index])

    def scale_model_input(self, sample: FloatArray, index: int) -> FloatArray:
        return sample

    def step(
        self, model_output: FloatArray, index: int, sample: FloatArray, noise: NoiseFn
    ) -> FloatArray:
        raise NotImplementedError

    def _x0(self, output: FloatArray, sample: FloatArray, a: np.float32) -> FloatArray:
        b = np.float32(1) - a
        if self.config["prediction_type"] == "epsilon":
            return (sample - b ** np.float32(0.5) * output) / a ** np.float32(0.5)
        if self.config["prediction_type"] == "v_prediction":
            return a ** np.float32(0.5) * sample - b ** np.float32(0.5) * output
        return output  # "sample"


class DDIM(Scheduler):
    """DDIM (eta 0: deterministic; eta > 0 draws noise)."""

    name = "ddim"
    defaults: ClassVar[dict[str, Any]] = {
        **Scheduler.defaults,
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "thresholding": False,
    }
    unsupported: ClassVar[dict[str, Any]] = {**Scheduler.unsupported, "thresholding": False}
    predictions = ("epsilon", "v_prediction", "sample")

    def __init__(self, config: Mapping[str, Any] | None = None, eta: float = 0.0) -> None:
        super().__init__(config)
        self.eta = float(eta)
        one = np.float32(1.0)
        self.final_alpha = one if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def set_timesteps(self, steps: int) -> None:
        self._check_steps(steps)
        self.steps = steps
        self.timesteps = self._spaced(steps, np.int64)

    def _alpha(self, t: int) -> np.float32:
        return self.alphas_cumprod[t] if t >= 0 else np.float32(self.final_alpha)

    def step(
        self, model_output: FloatArray, index: int, sample: FloatArray, noise: NoiseFn
    ) -> FloatArray:
        t = int(self.timesteps[index])
        prev = t - self.train_steps // self.steps
        a, a_prev = self._alpha(t), self._alpha(prev)
        b = np.float32(1) - a
        x0 = self._x0(model_output, sample, a)
        if self.config["prediction_type"] == "epsilon":
            eps = model_output
        elif self.config["prediction_type"] == "v_prediction":
            eps = a ** np.float32(0.5) * model_output + b ** np.float32(0.5) * sample
        else:
            eps = (sample - a ** np.float32(0.5) * x0) / b ** np.float32(0.5)
        if self.config["clip_sample"]:
            r = float(self.config["clip_sample_range"])
            x0 = np.clip(x0, -r, r)
        variance = (np.float32(1) - a_prev) / b * (np.float32(1) - a / a_prev)
        std = np.float32(self.eta) * variance ** np.float32(0.5)
        direction = (np.float32(1) - a_prev - std**2) ** np.float32(0.5) * eps
        out = a_prev ** np.float32(0.5) * x0 + direction
        if self.eta > 0:
            out = out + std * noise(model_output.shape)
        return out.astype(np.float32)


class Euler(Scheduler):
    """Euler (k-diffusion "Euler", no churn): sigmas interpolated over the train schedule."""

    name = "euler"
    defaults: ClassVar[dict[str, Any]] = {
        **Scheduler.defaults,
        "timestep_spacing": "linspace",
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "final_sigmas_type": "zero",
        "timestep_type": "discrete",
    }
    unsupported: ClassVar[dict[str, Any]] = {
        **Scheduler.unsupported,
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "timestep_type": "discrete",
    }

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.sigmas: FloatArray = np.zeros(0, np.float32)

    def set_timesteps(self, steps: int) -> None:
        self._check_steps(steps)
        self.steps = steps
        timesteps = self._spaced(steps, np.float32)
        acp = self.alphas_cumprod
        train_sigmas = ((np.float32(1) - acp) / acp) ** np.float32(0.5)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        if self.config.get("final_sigmas_type", "zero") == "sigma_min":
            last = float(((1 - acp[0]) / acp[0]) ** 0.5)
        else:
            last = 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.float32)

    @property
    def init_noise_sigma(self) -> float:
        peak = self.sigmas.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return float(peak)
        return float((peak**2 + np.float32(1)) ** np.float32(0.5))

    def scale_model_input(self, sample: FloatArray, index: int) -> FloatArray:
        sigma = self.sigmas[index]
        return (sample / ((sigma**2 + np.float32(1)) ** np.float32(0.5))).astype(np.float32)

    def _denoised(self, output: FloatArray, sample: FloatArray, sigma: np.float32) -> FloatArray:
        if self.config["prediction_type"] == "epsilon":
            return sample - sigma * output
        root = (sigma**2 + np.float32(1)) ** np.float32(0.5)
        return output * (-sigma / root) + sample / (sigma**2 + np.float32(1))

    def step(
        self, model_output: FloatArray, index: int, sample: FloatArray, noise: NoiseFn
    ) -> FloatArray:
        sigma = self.sigmas[index]
        x0 = self._denoised(model_output, sample, sigma)
        derivative = (sample - x0) / sigma
        return (sample + derivative * (self.sigmas[index + 1] - sigma)).astype(np.float32)


class EulerAncestral(Euler):
    """Euler ancestral: steps down to sigma_down, then adds noise of sigma_up (every step)."""

    name = "euler_a"
    defaults: ClassVar[dict[str, Any]] = {
        **Scheduler.defaults,
        "timestep_spacing": "linspace",
    }
    unsupported: ClassVar[dict[str, Any]] = dict(Scheduler.unsupported)

    def step(
        self, model_output: FloatArray, index: int, sample: FloatArray, noise: NoiseFn
    ) -> FloatArray:
        s_from, s_to = self.sigmas[index], self.sigmas[index + 1]
        x0 = self._denoised(model_output, sample, s_from)
        s_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** np.float32(0.5)
        s_down = (s_to**2 - s_up**2) ** np.float32(0.5)
        out = sample + (sample - x0) / s_from * (s_down - s_from)
        return (out + noise(model_output.shape) * s_up).astype(np.float32)


class LCM(Scheduler):
    """Latent consistency: few steps over the `original_inference_steps` grid; noise between."""

    name = "lcm"
    defaults: ClassVar[dict[str, Any]] = {
        **Scheduler.defaults,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "thresholding": False,
        "timestep_scaling": 10.0,
    }
    unsupported: ClassVar[dict[str, Any]] = {**Scheduler.unsupported, "thresholding": False}
    predictions = ("epsilon", "v_prediction", "sample")

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        one = np.float32(1.0)
        self.final_alpha = one if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def set_timesteps(self, steps: int) -> None:
        original = int(self.config["original_inference_steps"])
        self._check_steps(steps, original)
        self.steps = steps
        k = self.train_steps // original
        grid = (np.arange(1, original + 1) * k - 1)[::-1].copy()
        picks = np.floor(np.linspace(0, len(grid), num=steps, endpoint=False)).astype(np.int64)
        self.timesteps = grid[picks].astype(np.int64)

    def step(
        self, model_output: FloatArray, index: int, sample: FloatArray, noise: NoiseFn
    ) -> FloatArray:
        t = int(self.timesteps[index])
        prev = int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else t
        a = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else np.float32(self.final_alpha)
        scaled = np.float32(t * float(self.config["timestep_scaling"]))
        c_skip = np.float32(0.25) / (scaled**2 + np.float32(0.25))
        c_out = scaled / (scaled**2 + np.float32(0.25)) ** np.float32(0.5)
        x0 = self._x0(model_output, sample, a)
        if self.config["clip_sample"]:
            r = float(self.config["clip_sample_range"])
            x0 = np.clip(x0, -r, r)
        denoised = c_out * x0 + c_skip * sample
        if index == self.steps - 1:
            return denoised.astype(np.float32)
        root = np.float32(0.5)
        mixed = a_prev**root * denoised + (np.float32(1) - a_prev) ** root * noise(sample.shape)
        return mixed.astype(np.float32)


SCHEDULERS: dict[str, type[Scheduler]] = {
    "ddim": DDIM,
    "euler": Euler,
    "euler_a": EulerAncestral,
    "lcm": LCM,
}


def make_scheduler(name: str, config: Mapping[str, Any]) -> Scheduler:
    """A scheduler by name (ddim, euler, euler_a, lcm) over the pipeline's schedule config."""
    cls = SCHEDULERS.get(name)
    if cls is None:
        raise SchedulerError(f"unknown scheduler {name!r}; known: {', '.join(sorted(SCHEDULERS))}")
    return cls(config)


def numpy_noise(seed: int) -> NoiseFn:
    """Standard normal float32 noise from numpy's PCG64, seeded."""
    rng = np.random.default_rng(seed)

    def draw(shape: tuple[int, ...]) -> FloatArray:
        return rng.standard_normal(shape, dtype=np.float32)

    return draw

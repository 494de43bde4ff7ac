"""The numpy schedulers against diffusers' own, step by step, on made-up model outputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from models.diffusion.schedulers import (
    SCHEDULERS,
    SchedulerError,
    make_scheduler,
    numpy_noise,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

UPSTREAM = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "lcm": "LCMScheduler",
}


def torch_noise(seed: int) -> Any:
    """The noise diffusers' step draws with a generator, handed to ours through NoiseFn."""
    from diffusers.utils.torch_utils import randn_tensor

    generator = torch.Generator().manual_seed(seed)

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        return randn_tensor(shape, generator=generator, dtype=torch.float32).numpy()

    return draw


@pytest.mark.reference
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("name", sorted(UPSTREAM))
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"timestep_spacing": "linspace"},
        {"timestep_spacing": "trailing"},
        {"beta_schedule": "linear"},
    ],
)
def test_steps_match_diffusers(name: str, overrides: dict[str, Any]) -> None:
    config = {**SD_CONFIG, **overrides}
    if name == "lcm" and overrides.get("timestep_spacing"):
        pytest.skip("LCM has one timestep grid whatever the spacing")
    ours = make_scheduler(name, config)
    theirs = getattr(diffusers, UPSTREAM[name]).from_config(config)
    steps = 4 if name == "lcm" else 12
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    np.testing.assert_allclose(ours.timesteps, theirs.timesteps.numpy(), rtol=0, atol=1e-4)
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((1, 4, 8, 8), dtype=np.float32) * np.float32(ours.init_noise_sigma)
    theirs_sample = torch.from_numpy(sample.copy())
    generator = torch.Generator().manual_seed(7)
    noise = torch_noise(7)
    for index, t in enumerate(theirs.timesteps):
        model_in = ours.scale_model_input(sample, index)
        np.testing.assert_allclose(
            model_in, theirs.scale_model_input(theirs_sample, t).numpy(), atol=1e-4, rtol=1e-4
        )
        assert ours.model_timestep(index) == pytest.approx(float(t))
        output = np.tanh(model_in * 0.7 + rng.standard_normal(sample.shape, dtype=np.float32))
        sample = ours.step(output.astype(np.float32), index, sample, noise)
        theirs_sample = theirs.step(
            torch.from_numpy(output.astype(np.float32)), t, theirs_sample, generator=generator
        ).prev_sample
        np.testing.assert_allclose(sample, theirs_sample.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.reference
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_ddim_with_eta_draws_noise_like_diffusers() -> None:
    from models.diffusion.schedulers import DDIM

    ours = DDIM(SD_CONFIG, eta=0.5)
    theirs = diffusers.DDIMScheduler.from_config(SD_CONFIG)
    ours.set_timesteps(6)
    theirs.set_timesteps(6)
    sample = np.ones((1, 4, 4, 4), np.float32)
    theirs_sample = torch.from_numpy(sample.copy())
    generator, noise = torch.Generator().manual_seed(3), torch_noise(3)
    for index, t in enumerate(theirs.timesteps):
        output = np.full(sample.shape, 0.1, np.float32)
        sample = ours.step(output, index, sample, noise)
        theirs_sample = theirs.step(
            torch.from_numpy(output), t, theirs_sample, eta=0.5, generator=generator
        ).prev_sample
    np.testing.assert_allclose(sample, theirs_sample.numpy(), atol=1e-4)


def test_unknown_scheduler_and_bad_steps_are_errors() -> None:
    with pytest.raises(SchedulerError, match="unknown scheduler 'plms'"):
        make_scheduler("plms", SD_CONFIG)
    for name in SCHEDULERS:
        scheduler = make_scheduler(name, SD_CONFIG)
        with pytest.raises(SchedulerError, match="steps must be"):
            scheduler.set_timesteps(0)
    with pytest.raises(SchedulerError, match=r"steps must be 1\.\.50"):
        make_scheduler("lcm", SD_CONFIG).set_timesteps(51)
    with pytest.raises(SchedulerError, match="use_karras_sigmas"):
        make_scheduler("euler", {**SD_CONFIG, "use_karras_sigmas": True})
    with pytest.raises(SchedulerError, match="prediction_type"):
        make_scheduler("euler", {**SD_CONFIG, "prediction_type": "flow"})


def test_numpy_noise_is_seeded() -> None:
    a, b = numpy_noise(5), numpy_noise(5)
    assert np.array_equal(a((2, 3)), b((2, 3)))
    assert not np.array_equal(numpy_noise(6)((2, 3)), numpy_noise(5)((2, 3)))

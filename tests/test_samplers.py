"""DDIM and DPM-Solver++(2M) against diffusers' DDIMScheduler / DPMSolverMultistepScheduler, step by step,
driven by the same deterministic fake model."""
import math

import pytest
import torch
from oracles import oracle  # noqa: I001

oracle("diffusers")  # every test here compares with diffusers
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from mini_safediff.models import samplers
from mini_safediff.models.config import config_from_dict
from mini_safediff.models.schedule import NoiseSchedule, SchedulerConfig

from sd_configs import SD21_SCHEDULER, SD_SCHEDULER

CONFIGS = {"eps": SD_SCHEDULER, "v": SD21_SCHEDULER}
# name: (ours, diffusers' class, timesteps(skip_last=...))
SAMPLERS = {"ddim": (samplers.ddim, DDIMScheduler, False),
            "dpmpp_2m": (samplers.dpmpp_2m, DPMSolverMultistepScheduler, True)}


class FakeModel:
    """Output depends on x and t, like a UNet; records every call to compare the trajectories."""

    def __init__(self):
        self.bias = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(1))
        self.calls = []

    def __call__(self, x, t):
        self.calls.append((int(t), x.clone()))
        return 0.1 * x * math.cos(int(t)) + self.bias


def rel_err(ours, ref):
    return ((ours - ref).norm() / ref.norm()).item()


def run_both(sampler, name, steps, spacing="leading", eta=0.0):
    ours_fn, ref_class, _ = SAMPLERS[sampler]
    raw = {**CONFIGS[name], "timestep_spacing": spacing}
    latents = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    extra = {"eta": eta} if sampler == "ddim" else {}

    ref, ref_model = ref_class.from_config(raw), FakeModel()
    ref.set_timesteps(steps)
    x, generator = latents * ref.init_noise_sigma, torch.Generator().manual_seed(5)
    for t in ref.timesteps:
        x = ref.step(ref_model(x, t), t, x, generator=generator, **extra).prev_sample

    ours_model = FakeModel()
    got = ours_fn(ours_model, latents, NoiseSchedule(config_from_dict(SchedulerConfig, raw)), steps,
                  generator=torch.Generator().manual_seed(5), progress=False, **extra)
    return got, x, ours_model.calls, ref_model.calls


@pytest.mark.parametrize("steps", [1, 2, 10, 25, 50])
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.5), ("dpmpp_2m", 0.0)])
def test_trajectory_equals_diffusers(sampler, eta, name, steps):
    got, expected, ours_calls, ref_calls = run_both(sampler, name, steps, eta=eta)
    assert [t for t, _ in ours_calls] == [t for t, _ in ref_calls]
    for (t, x_ours), (_, x_ref) in zip(ours_calls, ref_calls):
        assert rel_err(x_ours, x_ref) < 1e-4, f"at t={t}"
    assert rel_err(got, expected) < 1e-4


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("sampler,eta", [("ddim", 0.5), ("dpmpp_2m", 0.0)])
def test_other_spacings_equal_diffusers(sampler, eta, name, spacing):
    got, expected, _, _ = run_both(sampler, name, 7, spacing=spacing, eta=eta)
    assert rel_err(got, expected) < 1e-4


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_timesteps_equal_diffusers(sampler, spacing):
    _, ref_class, skip_last = SAMPLERS[sampler]
    raw = {**SD_SCHEDULER, "timestep_spacing": spacing}
    schedule, ref = NoiseSchedule(config_from_dict(SchedulerConfig, raw)), ref_class.from_config(raw)
    for steps in [1, 2, 3, 7, 10, 20, 25, 50, 100, 999, 1000]:
        ref.set_timesteps(steps)
        if ref.timesteps[0] >= schedule.config.num_train_timesteps:  # diffusers would fail at its first step
            with pytest.raises(ValueError, match="past the schedule"):
                samplers.timesteps(schedule, steps, skip_last)
        else:
            assert samplers.timesteps(schedule, steps, skip_last) == ref.timesteps.tolist(), steps


def test_eta_noise_follows_the_generator():
    schedule = NoiseSchedule(SchedulerConfig())
    latents = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    run = lambda seed: samplers.ddim(FakeModel(), latents, schedule, 3, eta=1.0, progress=False,
                                     generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_bad_arguments_are_refused(sampler):
    sample, schedule, latents = SAMPLERS[sampler][0], NoiseSchedule(SchedulerConfig()), torch.zeros(1, 4, 2, 2)
    for steps in (0, 1001):
        with pytest.raises(ValueError, match=f"steps must be between 1 and 1000, got {steps}"):
            sample(FakeModel(), latents, schedule, steps, progress=False)
    if sampler == "ddim":
        with pytest.raises(ValueError, match="eta must be >= 0, got -0.1"):
            sample(FakeModel(), latents, schedule, 5, eta=-0.1, progress=False)


def test_a_step_count_past_the_schedule_is_refused_by_name():
    """Leading spacing with steps_offset 1 (SD's scheduler) at steps = 1000 would start at t = 1000, one past the
    schedule (diffusers reads past it and fails with an IndexError)."""
    from mini_safediff.models.samplers import timesteps
    from mini_safediff.models.schedule import NoiseSchedule, SchedulerConfig

    schedule = NoiseSchedule(SchedulerConfig(steps_offset=1, timestep_spacing="leading"))
    assert timesteps(schedule, 999)[0] == 999
    with pytest.raises(ValueError, match="steps 1000 would start at t = 1000, past the schedule's 1000 timesteps"):
        timesteps(schedule, 1000)

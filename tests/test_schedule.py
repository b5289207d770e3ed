"""NoiseSchedule and SchedulerConfig against diffusers' schedulers built from the SD scheduler configs."""
import json

import pytest
import torch
from oracles import oracle  # noqa: I001

oracle("diffusers")  # every test here compares with diffusers
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LMSDiscreteScheduler, PNDMScheduler)

from mini_safediff.models import samplers
from mini_safediff.models.config import ConfigError, config_from_dict
from mini_safediff.models.schedule import NoiseSchedule, SchedulerConfig

from sd_configs import SD21_SCHEDULER, SD_SCHEDULER

CONFIGS = {"eps": SD_SCHEDULER, "v": SD21_SCHEDULER}


def rel_err(ours, ref):
    return ((ours - ref).norm() / ref.norm()).item()


def schedules(name, **overrides):
    raw = {**CONFIGS[name], **overrides}
    return NoiseSchedule(config_from_dict(SchedulerConfig, raw, name)), DDPMScheduler.from_config(raw)


def noisy_batch():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 6, generator=g), torch.randn(4, 4, 8, 6, generator=g)
    return x0, noise, torch.tensor([0, 1, 500, 999])  # both ends of the schedule, one per sample


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_betas_and_alphas_cumprod_equal_diffusers(beta_schedule):
    ours, ref = schedules("eps", beta_schedule=beta_schedule)
    assert ours.betas.dtype == torch.float32 and torch.equal(ours.betas, ref.betas)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)


@pytest.mark.parametrize("name", CONFIGS)
def test_add_noise_target_predictions_equal_diffusers(name):
    ours, ref = schedules(name)
    x0, noise, t = noisy_batch()
    x_t = ours.add_noise(x0, noise, t)
    assert rel_err(x_t, ref.add_noise(x0, noise, t)) < 1e-4
    target = ours.target(x0, noise, t)
    assert rel_err(target, noise if name == "eps" else ref.get_velocity(x0, noise, t)) < 1e-4
    # predictions from the true target give back x0 and the noise (t = 999 amplifies rounding the most)
    assert rel_err(ours.predict_x0(x_t, target, t), x0) < 1e-4
    assert rel_err(ours.predict_eps(x_t, target, t), noise) < 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_predict_x0_equals_diffusers_ddim_pred_original_sample(name):
    ours, _ = schedules(name)
    ref = DDIMScheduler.from_config(CONFIGS[name])
    ref.set_timesteps(10)
    x_t, model_output, _ = noisy_batch()
    t = ref.timesteps[3]
    expected = ref.step(model_output, t, x_t).pred_original_sample
    assert rel_err(ours.predict_x0(x_t, model_output, t), expected) < 1e-4


def test_schedule_is_differentiable():
    ours, _ = schedules("v")
    x0, noise, t = noisy_batch()
    x0.requires_grad_(True)
    loss = (ours.predict_x0(ours.add_noise(x0, noise, t), ours.target(x0, noise, t), t) - x0).square().sum()
    loss.backward()
    assert x0.grad is not None and x0.grad.abs().max() < 1e-3  # predict_x0 inverts add_noise: loss ~ 0


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                                             EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                                             LMSDiscreteScheduler, PNDMScheduler])
@pytest.mark.parametrize("name", CONFIGS)
def test_full_configs_of_sd_scheduler_classes_are_read(scheduler_class, name):
    raw = dict(scheduler_class.from_config(CONFIGS[name]).config)  # every key the class writes when saved
    config = config_from_dict(SchedulerConfig, raw, scheduler_class.__name__)
    assert config.prediction_type == raw["prediction_type"]
    assert config.timestep_spacing == raw["timestep_spacing"] and config.steps_offset == 1


def test_missing_timestep_spacing_means_each_samplers_own_default(tmp_path):
    # SD 1.5 ships a PNDM config without timestep_spacing. diffusers fills in each class's default,
    # also when a sampler is swapped in from the loaded pipeline's scheduler.config.
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER))
    loaded = PNDMScheduler.from_pretrained(tmp_path)
    schedule = NoiseSchedule(config_from_dict(SchedulerConfig, SD_SCHEDULER))
    assert schedule.config.timestep_spacing is None and "timestep_spacing" not in schedule.config.to_dict()
    for ref_class, skip_last in [(DDIMScheduler, False), (DPMSolverMultistepScheduler, True)]:
        ref = ref_class.from_config(loaded.config)
        ref.set_timesteps(10)
        assert samplers.timesteps(schedule, 10, skip_last) == ref.timesteps.tolist()


def test_to_dict_round_trips_and_diffusers_reads_it_as_ours():
    config = config_from_dict(SchedulerConfig, SD21_SCHEDULER)
    saved = {"_class_name": "DDIMScheduler", **config.to_dict()}
    assert config_from_dict(SchedulerConfig, saved) == config
    ref = DDIMScheduler.from_config(saved).config
    for key, value in saved.items():
        if not key.startswith("_"):
            assert ref[key] == value, key
    assert ref.clip_sample is False  # True by default in diffusers


@pytest.mark.parametrize("key,value", [
    ("beta_schedule", "squaredcos_cap_v2"), ("prediction_type", "sample"), ("timestep_spacing", "karras"),
    ("clip_sample", True), ("trained_betas", [0.1] * 1000), ("use_karras_sigmas", True), ("solver_order", 3),
    ("algorithm_type", "sde-dpmsolver++"), ("final_sigmas_type", "sigma_min"), ("variance_type", "learned_range"),
    ("rescale_betas_zero_snr", True), ("thresholding", True), ("my_new_option", 1),
])
def test_unsupported_options_are_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=repr(key)):
        config_from_dict(SchedulerConfig, {**SD_SCHEDULER, key: value}, "scheduler_config.json")

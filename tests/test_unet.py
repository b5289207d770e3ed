"""UNet2DConditionModel against diffusers' on the same tiny random weights, loaded from diffusers' own files."""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from oracles import oracle  # noqa: I001

oracle("diffusers")  # every test here compares with diffusers
from diffusers import UNet2DConditionModel as DiffusersUNet
from safetensors.torch import load_file

import mini_safediff.models.unet as unet_module
from mini_safediff.models import cpu_speedups
from mini_safediff.models.config import ConfigError, config_from_dict, read_config
from mini_safediff.models.unet import UNet2DConditionModel, UNetConfig

from sd_configs import SD15_UNET, SD21_UNET, SDXL_UNET

CONTEXT_DIM = 24
POOLED_DIM = 20
TINY = {
    # SD 1 style: 1x1-conv projections, one head count for all blocks, two resnets per resolution.
    "sd1": dict(block_out_channels=(16, 32, 32), layers_per_block=2, cross_attention_dim=CONTEXT_DIM,
                attention_head_dim=2, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # SD 2 style: linear projections, per-block heads (all distinct, so using them in the wrong order shows),
    # float32 attention, attention blocks in an unusual order, in_channels != out_channels.
    "sd2": dict(block_out_channels=(16, 32, 48), layers_per_block=1, cross_attention_dim=CONTEXT_DIM,
                attention_head_dim=(1, 2, 3), norm_num_groups=8, use_linear_projection=True, upcast_attention=True,
                in_channels=5, out_channels=3,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D")),
    # SDXL style: no attention at the first level, a different transformer depth per level (the up path and the
    # middle must take them reversed and the last), the pooled text and six size numbers added to the timestep.
    "sdxl": dict(block_out_channels=(16, 32, 48), layers_per_block=2, cross_attention_dim=CONTEXT_DIM,
                 attention_head_dim=(1, 2, 3), transformer_layers_per_block=(1, 2, 3), norm_num_groups=8,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=POOLED_DIM + 6 * 8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
}


def rel_err(ours, ref):
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


def load_ours(folder) -> UNet2DConditionModel:
    model = UNet2DConditionModel(read_config(folder / "config.json", UNetConfig))
    model.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"), strict=True)
    return model.eval()


@pytest.fixture(scope="module", params=list(TINY))
def pair(request, tmp_path_factory):
    """(ours, diffusers') with the same weights, ours read back from the files diffusers saved."""
    torch.manual_seed(0)
    ref = DiffusersUNet(sample_size=8, **TINY[request.param])
    with torch.no_grad():  # no zero-initialised layer (conv_out, proj_out) may hide a wrong connection
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return load_ours(folder), ref.eval()


def inputs(model, height, width, batch=2, seed=1):
    """sample, context and the SDXL conditioning (empty for SD 1 / 2): pooled text, and per image an original
    size, a crop corner and a target size, all different."""
    torch.manual_seed(seed)
    added = {}
    if model.config.addition_embed_type:
        added = {"text_embeds": torch.randn(batch, POOLED_DIM),
                 "time_ids": torch.tensor([[1024.0, 768, 0, 0, 1024, 1024], [512, 640, 32, 16, 800, 1200]][:batch])}
    return torch.randn(batch, model.config.in_channels, height, width), torch.randn(batch, 7, CONTEXT_DIM), added


# 9x13: odd sides at every resolution; 4x6: with the CPU speed-ups, the 32-channel convs at 1x2 pixels run as
# unfold + GEMM (mini_safediff/models/cpu_speedups.py)
@pytest.mark.parametrize("speedups", [False, True])
@pytest.mark.parametrize("height, width", [(16, 24), (9, 13), (4, 6)])
@torch.no_grad()
def test_matches_diffusers(pair, height, width, speedups, monkeypatch):
    ours, ref = pair
    if speedups:
        ours = copy.deepcopy(ours)
        cpu_speedups.apply(unet=ours)
    sample, context, added = inputs(ours, height, width)
    unfold, gemm_calls = F.unfold, []
    for timestep in (10, 999.5, torch.tensor(10), torch.tensor([10]), torch.tensor([10, 500])):
        with monkeypatch.context() as patch:
            patch.setattr(F, "unfold", lambda *args, **kwargs: gemm_calls.append(1) or unfold(*args, **kwargs))
            out = ours(sample, timestep, context, **added)
        assert out.shape == (2, ours.config.out_channels, height, width)
        assert rel_err(out, ref(sample, timestep, context, added_cond_kwargs=added).sample) < 1e-4, timestep
    assert bool(gemm_calls) == speedups or (speedups and height != 4)  # at 4x6 the sped-up UNet takes the GEMM


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_half_precision(pair, dtype):
    """Low-precision smoke test: runs, keeps the dtype, and stays as close to the float32 reference as a
    rounding error of that dtype allows (diffusers in the same dtype lands at the same distance)."""
    ours, ref = pair
    half = UNet2DConditionModel(ours.config).to(dtype).eval()
    half.load_state_dict(ours.state_dict())
    sample, context, added = inputs(ours, 16, 24)
    out = half(sample.to(dtype), torch.tensor([10, 500]), context.to(dtype),
               **{key: value.to(dtype) for key, value in added.items()})
    assert out.dtype == dtype
    expected = ref(sample, torch.tensor([10, 500]), context, added_cond_kwargs=added).sample
    assert rel_err(out, expected) < (1e-2 if dtype == torch.float16 else 5e-2)


def test_gradient_checkpointing_changes_nothing(pair, monkeypatch):
    ours, _ = pair
    model = UNet2DConditionModel(ours.config).train()
    model.load_state_dict(ours.state_dict())
    sample, context, added = inputs(model, 9, 13, seed=2)
    calls = []

    def counting_checkpoint(*args, **kwargs):
        calls.append(kwargs["use_reentrant"])
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)
    monkeypatch.setattr(unet_module, "checkpoint", counting_checkpoint)

    def output_and_grads():
        model.zero_grad()
        out = model(sample, torch.tensor([10, 500]), context, **added)
        (out ** 2).mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out, grads = output_and_grads()
    assert calls == []
    model.gradient_checkpointing = True
    out_ckpt, grads_ckpt = output_and_grads()
    blocks = sum(isinstance(m, (unet_module.ResnetBlock2D, unet_module.BasicTransformerBlock))
                 for m in model.modules())
    assert calls == [False] * blocks  # every resnet and transformer block, non-reentrant
    assert torch.equal(out, out_ckpt)
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(grads_ckpt, grads))
    with torch.no_grad():  # nothing to recompute without gradients, nor in eval mode
        model(sample, 10, context, **added)
        model.eval()(sample, 10, context, **added)
    assert len(calls) == blocks


@pytest.mark.parametrize("config", [SD15_UNET, SD21_UNET, SDXL_UNET], ids=["sd15", "sd21", "sdxl"])
def test_full_size_keys_and_shapes(config):
    with torch.device("meta"):
        ours = UNet2DConditionModel(config_from_dict(UNetConfig, config))
        ref = DiffusersUNet.from_config(config)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    if config is SDXL_UNET:  # counted without memory: the paper's third model has 2.57B UNet parameters
        assert sum(p.numel() for p in ours.parameters()) == 2_567_463_684


def test_every_diffusers_option_is_classified():
    """Each UNet2DConditionModel argument is ours, fixed at diffusers' default, or without effect here."""
    defaults = {name: p.default for name, p in inspect.signature(DiffusersUNet.__init__).parameters.items()
                if name != "self"}
    fields = set(UNetConfig.__dataclass_fields__)
    assert defaults.keys() == fields | UNetConfig.FIXED.keys() | UNetConfig.IGNORED
    assert not (fields & UNetConfig.FIXED.keys() or fields & UNetConfig.IGNORED
                or UNetConfig.FIXED.keys() & UNetConfig.IGNORED)
    assert {key: defaults[key] for key in UNetConfig.FIXED} == UNetConfig.FIXED
    assert config_from_dict(UNetConfig, SD15_UNET) == UNetConfig()  # defaults are SD 1.5's


@pytest.mark.parametrize("change, message", [
    ({"brand_new_option": 3}, r"unet/config.json: unknown config option 'brand_new_option'"),
    ({"act_fn": "gelu"}, r"unet/config.json: option 'act_fn' = 'gelu' is not supported"),
    ({"class_embed_type": "timestep"}, r"option 'class_embed_type' = 'timestep' is not supported"),
    ({"down_block_types": ["AttnDownBlock2D"] * 4}, r"option 'down_block_types' = \['AttnDownBlock2D'"),
    ({"attention_head_dim": [5, 10]}, r"option 'attention_head_dim' = \[5, 10\] is not supported"),
    ({"addition_embed_type": "text"}, r"option 'addition_embed_type' = 'text' is not supported"),
    ({"addition_embed_type": "text_time"}, r"option 'projection_class_embeddings_input_dim' = None"),
    ({"transformer_layers_per_block": [[1, 2], [1, 2], [3, 4], [3, 4]]}, r"'transformer_layers_per_block' = \[\["),
    ({"num_attention_heads": 8}, r"option 'num_attention_heads' = 8 is not supported"),
    ({"reverse_transformer_layers_per_block": [1, 1, 1, 1]}, r"'reverse_transformer_layers_per_block'"),
])
def test_unsupported_config_is_refused_by_name(change, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(UNetConfig, {**SD21_UNET, **change}, "unet/config.json")


def test_timesteps_must_be_one_or_one_per_image(pair):
    ours, _ = pair
    sample, context, added = inputs(ours, 8, 8)
    with pytest.raises(ValueError, match="unet: 3 timesteps for a batch of 2"):
        ours(sample, torch.tensor([1, 2, 3]), context, **added)
    # one timestep for the batch embeds one row, which every resnet broadcasts (not one row per image)
    rows = []
    hook = ours.time_embedding.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    ours(sample, 10, context, **added)
    hook.remove()
    assert rows == [1]


def test_sdxl_conditioning_is_required_exactly_where_the_unet_has_it(pair):
    ours, _ = pair
    sample, context, added = inputs(ours, 8, 8)
    if added:
        with pytest.raises(ValueError, match="both needed by this UNet"):
            ours(sample, 10, context, text_embeds=added["text_embeds"])
        # the six numbers matter: another crop corner gives another output
        moved = {**added, "time_ids": added["time_ids"] + torch.tensor([0, 0, 8.0, 8, 0, 0])}
        assert not torch.allclose(ours(sample, 10, context, **added), ours(sample, 10, context, **moved))
    else:
        with pytest.raises(ValueError, match="for SDXL UNets only"):
            ours(sample, 10, context, text_embeds=torch.zeros(2, 4), time_ids=torch.zeros(2, 6))

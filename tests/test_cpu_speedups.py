"""The CPU speed-ups (mini_safediff/models/cpu_speedups.py) change speed, not results, and load_pipeline applies
them on the CPU only. Parity of the sped-up UNet with diffusers: tests/test_unet.py."""
import copy

import pytest
import torch
import torch.nn.functional as F

import mini_safediff as msd
from mini_safediff.models import cpu_speedups
from mini_safediff.models.cpu_speedups import GemmConv2d


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# gemm: whether the rule (at most in_channels / 4 and at most 256 output pixels in the batch) picks unfold + GEMM
@pytest.mark.parametrize("channels, kernel, stride, padding, batch, size, gemm", [
    (64, 3, 1, 1, 2, (1, 2), True), (64, 3, 2, 1, 1, (3, 5), True), (64, 1, 1, 0, 1, (2, 2), True),
    (64, 3, 1, 1, 1, (8, 8), False),  # 64 pixels > 64 / 4
    (1100, 1, 1, 0, 1, (16, 16), True), (1100, 1, 1, 0, 1, (16, 17), False)])  # 256 and 272 pixels
def test_gemm_conv_equals_conv2d_in_output_and_gradients(channels, kernel, stride, padding, batch, size, gemm,
                                                         monkeypatch):
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(channels, 48, kernel, stride=stride, padding=padding)
    conv = copy.deepcopy(ref)
    conv.__class__ = GemmConv2d
    x = torch.randn(batch, channels, *size, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    unfold, calls = F.unfold, []
    monkeypatch.setattr(F, "unfold", lambda *args, **kwargs: calls.append(1) or unfold(*args, **kwargs))
    out = conv(x)
    monkeypatch.undo()
    out_ref = ref(x_ref)
    grad = torch.randn_like(out_ref)
    out.backward(grad)
    out_ref.backward(grad)
    assert bool(calls) == gemm
    assert out.shape == out_ref.shape
    for ours, theirs in [(out, out_ref), (x.grad, x_ref.grad), (conv.weight.grad, ref.weight.grad),
                         (conv.bias.grad, ref.bias.grad)]:
        assert rel_err(ours, theirs) < 1e-6


@pytest.mark.parametrize("options", [dict(groups=2), dict(dilation=2), dict(padding_mode="reflect"),
                                     dict(bias=False)])
def test_only_convolutions_the_gemm_computes_are_eligible(options):
    assert cpu_speedups.gemm_eligible(torch.nn.Conv2d(64, 48, 3, padding=1))
    assert not cpu_speedups.gemm_eligible(torch.nn.Conv2d(64, 48, 3, padding=1, **options))


def test_load_pipeline_applies_them_on_the_cpu_without_changing_a_key(model):
    pipe = msd.load_pipeline(model, device="cpu")
    convs = {name: type(m) for name, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Conv2d)}
    sped_up = {name for name, cls in convs.items() if cls is GemmConv2d}
    assert sped_up and all(".resnets." in name or "samplers." in name for name in sped_up)
    assert {"conv_in", "conv_out"} <= convs.keys() - sped_up  # the model's ends stay plain nn.Conv2d
    assert pipe.unet.state_dict().keys() == msd.UNet2DConditionModel(pipe.unet.config).state_dict().keys()


@torch.no_grad()
def test_vae_runs_channels_last_on_cpu_with_the_same_result(model):
    """oneDNN's CPU convolutions reorder NCHW tensors on every call (time and a buffer the size of the output):
    the VAE works channels-last there, whatever the caller's layout, with the same result."""
    plain = msd.load_pipeline(model, device="cpu").vae
    fast = copy.deepcopy(plain)
    plain._forward_pre_hooks.clear()
    plain.encoder._forward_pre_hooks.clear()
    plain.post_quant_conv._forward_pre_hooks.clear()
    seen = []
    record = lambda module, args, out: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))  # noqa: E731
    hooks = [fast.decoder.up_blocks[0].resnets[0].conv1.register_forward_hook(record),
             fast.encoder.down_blocks[-1].resnets[0].conv1.register_forward_hook(record)]
    latents = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(3))
    images = fast.decode(latents)
    encoded = fast.encode(images.contiguous()).mean
    for hook in hooks:
        hook.remove()
    assert seen == [True, True]  # the decoder's and the encoder's convolutions
    assert rel_err(images, plain.decode(latents)) < 1e-5  # float rounding; the parity tests allow 1e-4
    assert rel_err(encoded, plain.encode(images).mean) < 1e-5
    assert torch.equal(images, fast.decode(latents.contiguous(memory_format=torch.channels_last)))


@pytest.mark.skipif(not cpu_speedups.onednn_linear_available(), reason="this torch has no oneDNN linear op")
@pytest.mark.parametrize("shape, bias", [((6, 77, 64), False), ((3, 5, 7, 64), True), ((4, 64), True)])
def test_onednn_linear_equals_linear_and_keeps_autograd(shape, bias):
    """Without autograd the oneDNN kernel gives nn.Linear's output (also for a non-contiguous input); with autograd
    it is nn.Linear itself, gradients included."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(64, 48, bias=bias)
    fast = copy.deepcopy(ref)
    fast.__class__ = cpu_speedups.OneDNNLinear
    x = torch.randn(shape)
    with torch.no_grad():
        for inputs in (x, torch.randn(shape[::-1]).permute(*reversed(range(len(shape))))):
            assert rel_err(fast(inputs), ref(inputs)) < 1e-6
    x.requires_grad_()
    fast(x).square().sum().backward()
    assert x.grad is not None and fast.weight.grad is not None


def test_load_pipeline_gives_the_unet_linears_the_onednn_path(model):
    linears = [m for m in msd.load_pipeline(model, device="cpu").unet.modules() if isinstance(m, torch.nn.Linear)]
    expected = cpu_speedups.OneDNNLinear if cpu_speedups.onednn_linear_available() else torch.nn.Linear
    assert linears and all(type(m) is expected for m in linears)

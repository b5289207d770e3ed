"""Speed-ups for the CPU, applied to a loaded model by `load_pipeline` (and to the freshly built models of
pretraining), so that unet.py and vae.py read as the reference. Neither changes a weight or a state-dict key;
each earns its place by a measured gain on a 2-core CPU (docs/performance.md, benchmarks/components.py).
Off the CPU the models run as written.

- UNet convolutions over a small feature map with many channels run as one matrix product over unfolded
  patches (GemmConv2d): for SD's 1280-channel layers at 8x8 and 16x16 latent pixels 2x and 1.2x faster,
  forward and backward, than PyTorch's CPU convolution (oneDNN). Most likely oneDNN copies the weight
  (59 MB there) into its blocked layout on every call, which costs more than the arithmetic over so few
  pixels; that explanation is not verified, the speed difference is measured.
- The UNet's linear layers, at inference (no autograd) in float32, go to oneDNN's linear kernel
  (OneDNNLinear, through torch.ops.mkldnn._linear_pointwise, the op torch.compile's CPU backend uses) instead
  of torch.mm / addmm, whose BLAS (MKL) reached about half of oneDNN's float32 rate on the 2-core AMD CPU. The
  built-in model's forward at the miniature's generation batch (832 rows) took 0.82x the time, the SD 1.5
  UNet's forward 0.85x (benchmarks/gemm_fraction.py, docs/performance.md). Training keeps
  nn.Linear: the op has no backward.
- The VAE runs channels-last: its convolutions (few channels, large images) go to oneDNN, which reorders an
  NCHW tensor on every call, costing time and a buffer the size of the output. Channels-last measured ~20%
  faster with ~20% less peak memory at 256 px. (The UNet did not gain and stays NCHW.)
"""
import torch
import torch.nn.functional as F
from torch import nn

from .unet import Downsample2D, ResnetBlock2D, Upsample2D

# The GEMM wins only below these sizes (measured on 2 cores): with more pixels per channel oneDNN is faster
# again (at batch 2, 16x16, 2560 channels it was 1.3-1.6x faster).
GEMM_MAX_PIXELS = 256  # output pixels in the whole batch
GEMM_MIN_CHANNELS_PER_PIXEL = 4  # in_channels / output pixels


class GemmConv2d(nn.Conv2d):
    """nn.Conv2d that, on the CPU, computes a small feature map with many channels as im2col + one GEMM. Only
    modules with zero padding, groups=1, dilation=1 and a bias get this class (`apply`)."""

    def forward(self, x):
        if x.device.type != "cpu":
            return super().forward(x)
        B, _, H, W = x.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        H_out, W_out = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
        pixels = B * H_out * W_out
        if pixels > GEMM_MAX_PIXELS or GEMM_MIN_CHANNELS_PER_PIXEL * pixels > self.in_channels:
            return super().forward(x)
        patches = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # (B, C*kh*kw, pixels)
        out = self.weight.flatten(1) @ patches + self.bias[:, None]  # (B, out_channels, pixels)
        return out.unflatten(-1, (H_out, W_out))


def onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDNNLinear(nn.Linear):
    """nn.Linear that, on the CPU in float32 without autograd, computes x @ W.T + b with oneDNN's linear
    kernel (the same product, another library)."""

    def forward(self, x):
        if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled():
            return super().forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def gemm_eligible(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros" and conv.bias is not None)


def channels_last_on_cpu(module, args):
    """Forward pre-hook: the first input in channels-last memory when it is on the CPU."""
    x = args[0]
    return (x.contiguous(memory_format=torch.channels_last), *args[1:]) if x.device.type == "cpu" else None


def apply(unet=None, vae=None):
    """Give the UNet's resnet and resampling convolutions the GEMM path and its linear layers the oneDNN path,
    and run the VAE channels-last on the CPU. In place; the same outputs up to float rounding."""
    if unet is not None:
        for module in unet.modules():
            if type(module) is nn.Linear and onednn_linear_available():
                module.__class__ = OneDNNLinear  # the same parameters and keys, another forward
        for block in unet.modules():
            if isinstance(block, (ResnetBlock2D, Downsample2D, Upsample2D)):
                for conv in block.children():
                    if gemm_eligible(conv):
                        conv.__class__ = GemmConv2d  # the same parameters and keys, another forward
    if vae is not None:
        vae.encoder.register_forward_pre_hook(channels_last_on_cpu)  # images in
        vae.post_quant_conv.register_forward_pre_hook(channels_last_on_cpu)  # latents in

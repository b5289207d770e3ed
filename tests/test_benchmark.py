"""benchmarks/components.py and train_memory.py are scripts, not tests; these keep them runnable (components.py's
GPU variants included, as far as a CPU runs them) and check the FLOP count behind its MFU column and the memory
that train_memory.py reads."""
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import components  # noqa: E402
from oracles import oracle  # noqa: E402

from mini_safediff.models.config import config_from_dict  # noqa: E402
from mini_safediff.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402


def test_writes_a_row_per_component_and_variant(tmp_path, monkeypatch):
    oracle("diffusers")  # the other side of every row
    oracle("transformers")
    out = tmp_path / "results.md"
    variants = ["fp32", "bf16+channels_last"]
    monkeypatch.setattr(sys, "argv", ["components.py", "--config", "tiny", "--repeats", "1", "--warmup", "0",
                                      "--variants", ",".join(variants), "--out", str(out)])
    components.main()
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| tiny")]
    assert [(row[1], row[2]) for row in rows] == [(c, v) for v in variants for c in components.COMPONENTS]
    for row in rows:
        ratio, rel_diff = float(row[5].strip("*")), float(row[-1].removesuffix(" |"))
        assert ratio > 0
        # same weights on both sides: float32 agrees to rounding; bf16 to bf16's rounding (8 bits of mantissa)
        assert rel_diff < (1e-4 if row[2] == "fp32" else 0.05), row


def test_train_flops_count_the_backward():
    """Backward costs about twice the forward (input and weight gradients; conv_in needs no input gradient)."""
    config = components.CONFIGS["tiny"]()
    with torch.device("meta"):
        unet = UNet2DConditionModel(config_from_dict(UNetConfig, config["unet"]))
        sample = torch.randn(config["batch"], unet.config.in_channels, config["latent"], config["latent"])
        context = torch.randn(config["batch"], 77, unet.config.cross_attention_dim)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(sample, torch.zeros(config["batch"]), context)
    assert 2.8 < components.train_flops(config) / counter.get_total_flops() <= 3.0


def test_train_memory_measures_train_py(tmp_path):
    """benchmarks/train_memory.py's runs of train.py (built-in model): the recipe's flags take less memory than float32
    without checkpointing, and each peak holds at least the UNet's weights, gradients and AdamW moments."""
    import train_memory

    from mini_safediff.miniature.digits import builtin_dataset
    from mini_safediff.models.loading import load_pipeline
    from mini_safediff.models.pipeline import BUILTIN_MODEL

    recipe, full = train_memory.run_variants(BUILTIN_MODEL, builtin_dataset(tmp_path), [train_memory.RECIPE, "--dtype float32"],
                                             "cpu", steps=2, workdir=tmp_path)
    weight_bytes = 4 * sum(p.numel() for p in load_pipeline(BUILTIN_MODEL, device="cpu").unet.parameters())
    assert recipe["peak_bytes"] >= 3 * weight_bytes  # float32 weights and gradients, two bfloat16 moments
    assert full["peak_bytes"] >= 4 * weight_bytes  # float32 weights, gradients and moments
    assert recipe["peak_bytes"] < full["peak_bytes"]
    assert recipe["step_seconds"] > 0 and full["step_seconds"] > 0  # from train.py's log


def test_gemm_fraction_prints_the_fraction_of_the_peak(tmp_path, capsys):
    """benchmarks/gemm_fraction.py on the tiny config, cut down (few images, one step, one repeat): it prints the
    peak, the tiny UNet's fraction of it and the evaluation cell's phases, and writes the same to --out."""
    import re

    import gemm_fraction

    out = tmp_path / "fraction.md"
    gemm_fraction.main(["--configs", "tiny", "--peak-size", "256", "--peak-repeats", "1", "--repeats", "1",
                        "--phase-repeats", "1", "--images", "8", "--sampling-steps", "1", "--profile", "--profile-rows", "3",
                        "--out", str(out)])
    printed = capsys.readouterr().out
    assert re.search(r"GEMM peak: [\d.]+ GFLOP/s", printed)
    row = next(line for line in printed.splitlines() if line.startswith("| tiny | 16 |"))  # 8 images x 2 branches
    fraction = float(re.search(r"\*\*([\d.]+)%\*\*", row).group(1))
    assert 0 < fraction
    for phase in ("text encoding", "denoising loop", "VAE decode", "digit judge"):
        assert f"| {phase} |" in printed
    assert "Self CPU" in printed
    assert out.read_text().splitlines()[2:5] == printed.splitlines()[2:5]

"""Stable Diffusion 1.x / 2.x / XL written by hand: UNet, VAE, CLIP text encoders and tokenizer, the noise schedule and
samplers, weight files in both layouts, and the pipeline that holds them together. Each model file reads as
its diffusers / transformers reference; CPU speed-ups live apart in cpu_speedups.py."""

"""Evaluation of real Stable Diffusion models: prompt files, the image cache, the NudeNet and Q16 judges, CLIP
score, aesthetic score, Frechet distance (real.py runs them for evaluate.py)."""

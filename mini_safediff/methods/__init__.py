"""Defences, one file each (docs/layers.md). Safety trainings, run by train.py through one interface
(method.py: options, trained parameters, batch, loss, state) and listed by name in registry.py:
contrastive.py (the paper's LT and NG: the contrastive-forgetting loss and the class centres), naive.py (plain
ascent on harmful rows, the study's baseline), esd.py (ESD-u and ESD-x, erasing a concept given as text,
data-free) and immunize.py (beyond the paper: immunization by simulated attacks). At sampling time: sld.py (Safe
Latent Diffusion, a guidance hook for Pipeline.generate)."""

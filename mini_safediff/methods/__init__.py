"""Safety methods: the paper's contrastive forgetting (contrastive.py) and the baselines Safe Latent Diffusion
(sld.py) and Erasing Stable Diffusion (esd.py)."""

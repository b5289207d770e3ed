"""Safety methods: the paper's contrastive forgetting (contrastive.py) and the baselines Safe Latent Diffusion
(sld.py) and ESD, erasing concepts by fine-tuning (esd.py)."""

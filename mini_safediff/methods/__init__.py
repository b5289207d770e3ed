"""Safety methods: the paper's contrastive forgetting (contrastive.py)."""

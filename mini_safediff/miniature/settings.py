"""The miniature's presets: its calibrated training and attack, and how every row is sampled. Plain data, so that
the scripts and the CLI read them without importing the judge or the evaluation code."""

# The miniature's calibrated safety training (`train.py --preset miniature`: the study's lt row; docs/miniature.md
# says how it was chosen) and attack (`attack.py --preset miniature`: the study's strong attack, calibrated on
# the naive baseline alone).
MINIATURE_TRAIN = {"steps": 200, "lr": 3e-5, "batch_size": 8, "balanced": True, "method": "lt", "lam": 3e-3,
                   "harmful_weight": -0.5}
MINIATURE_ATTACK = {"lr": 1e-4, "batch_size": 8, "steps": 100}
# Sampling of every row (evaluate.py's defaults with the digit judge), whatever its defaults for real models are.
SAMPLING_STEPS = 20
SAMPLING_GUIDANCE = 5.0

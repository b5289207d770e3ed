"""The built-in miniature: handwritten digits as data (digit 7 plays the harmful concept), the tiny model's
pretraining, the digit judge (judge.py), the miniature's presets (settings.py) and judging (experiment.py), and
the study that evaluate.py runs with no --model: its plan (study.py), runner (runner.py), statistics and report."""

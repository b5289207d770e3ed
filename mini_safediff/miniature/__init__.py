"""The built-in miniature: handwritten digits as data (digit 7 plays the harmful concept), the tiny model's
pretraining, the digit judge, and the experiment that evaluate.py runs with no arguments (experiment.py)."""

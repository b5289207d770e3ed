"""mini_safediff safety training (contrastive forgetting, LT/NG). Not built yet: see issue 4."""
import sys

if __name__ == "__main__":
    sys.exit("train.py: not yet implemented (safety training (contrastive forgetting, LT/NG) lands with issue 4).")

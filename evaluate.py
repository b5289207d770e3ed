"""mini_safediff evaluation (metrics and tables). Not built yet: see issue 6."""
import sys

if __name__ == "__main__":
    sys.exit("evaluate.py: not yet implemented (evaluation (metrics and tables) lands with issue 6).")

"""mini_safediff malicious fine-tuning attack. Not built yet: see issue 5."""
import sys

if __name__ == "__main__":
    sys.exit("attack.py: not yet implemented (malicious fine-tuning attack lands with issue 5).")

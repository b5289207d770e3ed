"""Attacks on released weights, one file each, run by attack.py's subcommands: malicious fine-tuning
(finetune.py: the full UNet, or LoRA adapters from lora.py; `attack.py finetune`) and UnlearnDiffAtk, a prompt
attack (unlearndiffatk.py: the attack on one prompt; prompt.py: every prompt of every model; `attack.py prompt`).
They import no method, evaluation or miniature code (docs/layers.md)."""

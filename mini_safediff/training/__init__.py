"""What train.py and attack.py share: the dataset and batch order, the step's random draws and losses, the
optimizers, checkpoints and logs, LoRA. The loops themselves stay flat in the scripts."""

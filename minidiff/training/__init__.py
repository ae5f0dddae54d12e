"""The trainer, its verified checkpoints and the training scripts' shared command line."""

"""The training loop, its resume policy, the run directory, verified checkpoints, the scripts' shared flags."""

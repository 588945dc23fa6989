"""Render and submit training jobs (SLURM, EKS) from the same config as `python -m trainer`."""

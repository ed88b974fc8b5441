"""Test infrastructure: a real SLURM cluster (slurm.py)."""

"""Run tracking: JSONL files, console progress, Weights & Biases. Only rank 0 tracks."""

from bigtrain.tracking.tracker import Tracker

__all__ = ["Tracker"]

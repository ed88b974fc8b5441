"""Fault-tolerant checkpoints: :mod:`.files` (layout, manifest, verification, RNG),
:mod:`.policy` (when to save), :mod:`.manager` (atomic and async commits, retention, resume)."""

from bigtrain.checkpoint.files import (
    MANIFEST,
    CheckpointError,
    CheckpointSaveError,
    best_checkpoint,
    derived_dir,
    fault_point,
    list_checkpoints,
    rng_state,
    set_rng_state,
    step_of,
    verify,
    write_manifest,
)
from bigtrain.checkpoint.manager import CheckpointManager, done_future
from bigtrain.checkpoint.policy import Stateful, save_decision

__all__ = ["MANIFEST", "CheckpointError", "CheckpointManager", "CheckpointSaveError", "Stateful", "best_checkpoint",
           "derived_dir", "done_future", "fault_point", "list_checkpoints", "rng_state", "save_decision",
           "set_rng_state", "step_of", "verify", "write_manifest"]

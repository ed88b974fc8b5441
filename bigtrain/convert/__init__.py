"""Switch a run's engine: convert a checkpoint between single/ddp, fsdp and DeepSpeed ZeRO-1/2/3,
at any world size (:mod:`.core`), through an engine-neutral full training state (:mod:`.state`):
fp32 master weights, AdamW's step and moments per parameter, the parameter groups, buffers and
the gradient scaler. The fp32 master weights are the source of truth: every reader takes the
engine's fp32 copy, every writer writes it bit for bit.

    python -m bigtrain.convert RUN_DIR [--step N] --to ENGINE [--stage S] [--world-size M] OUT_DIR
"""

from bigtrain.convert.core import checkpoint_engine, convert_checkpoint, converted_for, label, same_engine

__all__ = ["checkpoint_engine", "convert_checkpoint", "converted_for", "label", "same_engine"]

"""The ``strategy`` section: the engine (single, ddp, fsdp, deepspeed) and its own settings.

Field docstrings are descriptions (see :mod:`bigtrain.config.sections`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from bigtrain.config.base import _Section

# DeepSpeed keys bigtrain generates from its own config; `extra` may not override them.
_DS_MANAGED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "bf16", "fp16")


class DeepSpeedSection(_Section):
    """DeepSpeed ZeRO settings (strategy.name=deepspeed)."""

    stage: int = Field(2, ge=0, le=3)
    """ZeRO stage: 0 none, 1 optimizer state, 2 + gradients, 3 + parameters sharded over ranks."""
    offload_optimizer: bool = False
    """ZeRO-Offload: optimizer state and step on the CPU (DeepSpeed's CPU Adam); stage 1, 2 or 3."""
    offload_param: bool = False
    """ZeRO-Infinity style parameter offload to the CPU (stage 3 only)."""
    pretrained_from: Literal["rank0", "every_rank"] = "every_rank"
    """ZeRO-3, causal LMs with model.pretrained (full fine-tuning): every_rank: each rank maps the checkpoint
    (safetensors, read lazily) and ZeRO partitions it; rank0: the model is built partitioned (deepspeed.zero.Init),
    rank 0 reads the checkpoint into memory and each rank receives its partitions. Measured on CPU (README), rank0
    does not lower any rank's peak."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Merged into the generated DeepSpeed JSON (not the batch, clipping or precision keys bigtrain sets)."""

    @model_validator(mode="after")
    def _possible(self) -> DeepSpeedSection:
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("strategy.deepspeed.offload_optimizer needs ZeRO stage 1, 2 or 3 (stage is 0)")
        if self.offload_param and self.stage != 3:
            raise ValueError(f"strategy.deepspeed.offload_param needs ZeRO stage 3 (stage is {self.stage})")
        for key in _DS_MANAGED:
            if key in self.extra:
                raise ValueError(f"strategy.deepspeed.extra.{key}: set by bigtrain from train.*/precision; "
                                 "change those keys instead")
        zero = self.extra.get("zero_optimization", {})
        if not isinstance(zero, dict):
            raise ValueError("strategy.deepspeed.extra.zero_optimization: expected a mapping")
        if "stage" in zero:
            raise ValueError("strategy.deepspeed.extra.zero_optimization.stage: use strategy.deepspeed.stage")
        for key, flag in (("offload_optimizer", self.offload_optimizer), ("offload_param", self.offload_param)):
            if key in zero and not flag and "optimizer" not in self.extra:
                raise ValueError(
                    f"strategy.deepspeed.extra.zero_optimization.{key}: ZeRO-Offload cannot step a client "
                    f"(torch) optimizer; set strategy.deepspeed.{key}: true so bigtrain configures DeepSpeed's "
                    f"CPU Adam")
        return self


class FSDPSection(_Section):
    """FSDP2 settings (strategy.name=fsdp)."""

    reshard_after_forward: bool = True
    """Free the gathered parameters after forward and gather them again for backward (less memory)."""
    cpu_offload: bool = False
    """Keep parameters, gradients and optimizer state on the CPU."""
    replicate: int = Field(1, ge=1)
    """HSDP: replicas of the sharded model; replicate x shard = world size."""
    shard: int | None = Field(None, ge=1)
    """HSDP: ranks one replica is sharded over; default: world size / replicate."""
    pretrained_from: Literal["rank0", "every_rank"] = "rank0"
    """Transformers with model.pretrained (full fine-tuning: causal LM, SFT, masked LM, classifier): rank0 reads
    the checkpoint on rank 0 alone, the other ranks build the model on the meta device and receive their shards (no
    rank but 0 holds the whole model); every_rank: each rank reads the whole checkpoint, then shards it."""


class StrategySection(_Section):
    """How the model is spread over the ranks: one process, DDP, FSDP2 or DeepSpeed ZeRO."""

    name: Literal["single", "ddp", "fsdp", "deepspeed"] = "single"
    """The engine: single (one process), ddp, fsdp or deepspeed."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them (not for resnet)."""
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    fsdp: FSDPSection = FSDPSection()

"""FSDP2: ``fully_shard`` per transformer block and at the root, sharded (DCP) checkpoints.

Parameters, gradients and optimizer state live as DTensor shards (1/N per rank). Mixed
precision is FSDP's own ``MixedPrecisionPolicy`` (bf16/fp16 compute copies, fp32 gradient
reduction, fp32 master shards). Multi-node: ``strategy.fsdp.replicate`` x ``shard`` = world size
gives HSDP (shard within a group, replicate across groups). Checkpoints go through
torch.distributed.checkpoint, which reshards on load when the world size changed.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from bigtrain import dist
from bigtrain.checkpoint import fault_point
from bigtrain.dist import LOW_PRECISION
from bigtrain.models import batch_norms, repeated_blocks
from bigtrain.models.gpt import rank0_loads_pretrained
from bigtrain.models.lora import trainable_names
from bigtrain.optim import build_optimizer, param_groups
from bigtrain.strategies import memory
from bigtrain.strategies.base import (
    Strategy,
    enable_activation_checkpointing,
    to_device,
)

DCP_DIR = "dcp"


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _fill_from_rank0(model: nn.Module, full: dict, buffers: dict, device: torch.device) -> None:
    """Collective: allocate the sharded ``model`` (built on the meta device) and fill it from rank 0's
    ``full`` state dict (CPU; empty elsewhere), each rank keeping its shards; buffers (rotary
    frequencies are not in the state dict) are broadcast from rank 0's ``buffers``."""
    model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buf in model.named_buffers():
        if name in buffers:
            buf.copy_(buffers[name])
        torch.distributed.broadcast(buf, src=0)


class FSDPStrategy(Strategy):
    name = "fsdp"

    def _mesh(self):
        fcfg = self.cfg.strategy.fsdp
        world = self.info.world_size
        shard = fcfg.shard or world // fcfg.replicate
        if fcfg.replicate * shard != world:
            raise ValueError(f"strategy.fsdp.replicate x shard ({fcfg.replicate} x {shard}) must equal the world size "
                             f"({world})")
        if fcfg.replicate == 1:
            return init_device_mesh(self.device.type, (world,), mesh_dim_names=("shard",))
        return init_device_mesh(self.device.type, (fcfg.replicate, shard), mesh_dim_names=("replicate", "shard"))

    def setup(self, model: nn.Module) -> None:
        if self.cfg.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        fcfg = self.cfg.strategy.fsdp
        if self.cfg.strategy.activation_checkpointing:
            enable_activation_checkpointing(model)
        from_rank0 = rank0_loads_pretrained(self.cfg, self.info.world_size)
        if from_rank0:  # rank 0 keeps the weights it read on the CPU; every rank shards an empty structure
            full, buffers = ((model.state_dict(), {n: b.clone() for n, b in model.named_buffers()})
                             if self.info.rank == 0 else ({}, {}))
            model.to("meta")
            if hasattr(model, "tie_weights"):
                model.tie_weights()  # .to() gives tied parameters separate meta tensors
        else:
            model.to(self.device)
        kwargs = {"mesh": self._mesh(), "reshard_after_forward": fcfg.reshard_after_forward}
        if self.cfg.precision in LOW_PRECISION:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=LOW_PRECISION[self.cfg.precision],
                                                       reduce_dtype=torch.float32)
        if fcfg.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        if "mp_policy" in kwargs:
            # BatchNorm in fp32: bf16 parameters next to its fp32 running statistics fail, and
            # low-precision statistics drift. Own units, fp32 parameters, output back in bf16.
            norm_kwargs = {**kwargs, "mp_policy": MixedPrecisionPolicy(
                param_dtype=torch.float32, reduce_dtype=torch.float32, output_dtype=LOW_PRECISION[self.cfg.precision])}
            for norm in batch_norms(model):
                fully_shard(norm, **norm_kwargs)
        for block in repeated_blocks(model):
            if self.cfg.train.compile:  # per block, before sharding (as torchtitan): FSDP's hooks stay eager
                block.compile()
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        self.from_rank0 = from_rank0
        if from_rank0:
            _fill_from_rank0(model, full, buffers, self.device)
            del full, buffers
        self.model = self.raw_model = model
        # no devices: fused kernels do not take DTensor shards everywhere (auto: foreach)
        self.optimizer = build_optimizer(param_groups(model, self.cfg.optim.weight_decay), self.cfg.optim)
        self.scaler = None
        if self.cfg.precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler()

    def precision_context(self):
        return contextlib.nullcontext()  # MixedPrecisionPolicy casts the parameters

    def details(self) -> str:
        compiled = sum(getattr(b, "_compiled_call_impl", None) is not None for b in repeated_blocks(self.model))
        return (super().details() + (f", compiled {compiled} blocks" if compiled else "")
                + (", model.pretrained read on rank 0 only (shards broadcast)" if self.from_rank0 else ""))

    def forward_backward(self, batch, scale, last_micro):
        self.model.set_requires_gradient_sync(last_micro)  # reduce-scatter only on the last micro-batch
        loss = self.objective(self.model, to_device(batch, self.device))
        scaled = loss * scale
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return loss.detach()

    def step(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.train.grad_clip or float("inf")
        # The norm of DTensor gradients is the global norm over every shard.
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    # -- checkpoints: sharded, through DCP ---------------------------------------------------
    def _options(self) -> StateDictOptions | None:
        """LoRA: checkpoints hold the trainable parameters alone (the rest is model.pretrained)."""
        return StateDictOptions(ignore_frozen_params=True, strict=False) if self.cfg.model.lora else None

    def _state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options())
        state = {"model": model_sd, "optim": optim_sd}
        if self.scaler:
            state["scaler"] = self.scaler.state_dict()
        return state

    # DCP's collectives run on the checkpoint group (gloo): an async save runs them from a
    # background thread while training goes on over the default group.
    def save(self, directory: Path) -> None:
        dcp.save(self._state(), checkpoint_id=str(directory / DCP_DIR), process_group=dist.checkpoint_group())
        fault_point("checkpoint-engine-write")

    def async_save(self, directory: Path) -> Future:
        return dcp.async_save(self._state(), checkpoint_id=str(directory / DCP_DIR),
                              process_group=dist.checkpoint_group())

    def load(self, directory: Path) -> None:
        state = self._state()
        # reshards if the world size changed
        dcp.load(state, checkpoint_id=str(directory / DCP_DIR), process_group=dist.checkpoint_group())
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self._options())
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])

    def full_model_state(self):
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def generation_model(self):
        return self.model

    def memory_report(self):
        report = memory.report(self.model, self.optimizer, self.device)  # local shards only
        # While a block runs, its parameters are all-gathered (unsharded) in the compute dtype:
        # computed from the parameter counts, not measured.
        compute_bytes = 2 if self.cfg.precision in LOW_PRECISION else 4
        report["fsdp_unsharded_block_bytes_estimate"] = max(
            (sum(p.numel() for p in block.parameters()) * compute_bytes for block in repeated_blocks(self.model)),
            default=0)
        return report


def load_consolidated(model: nn.Module, directory: Path, partial: bool = False) -> None:
    """Load a DCP checkpoint's model weights into a plain model, without a process group
    (``partial``: a LoRA checkpoint, which holds the trainable parameters alone)."""
    keep = trainable_names(model) if partial else None
    state = {"model": {k: v for k, v in model.state_dict().items() if keep is None or k in keep}}
    dcp.load(state, checkpoint_id=str(Path(directory) / DCP_DIR), no_dist=True)
    model.load_state_dict(state["model"], strict=not partial)

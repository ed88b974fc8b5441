"""The one interface every engine implements. ``train.py`` talks only to this.

A strategy owns: wrapping the model, building the optimizer, mixed precision, the
forward/backward of a micro-batch (including gradient-accumulation sync), clipping and the
optimizer step, saving/loading its part of a checkpoint, and reporting memory.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigtrain.config import RunConfig
from bigtrain.data.stream import BOOKKEEPING
from bigtrain.dist import LOW_PRECISION, DistInfo
from bigtrain.losses import cross_entropy


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy (in fp32, chunked over large vocabularies): the default objective."""
    return cross_entropy(model(input_ids=batch["input_ids"]).logits, batch["labels"])


def to_device(batch: dict[str, torch.Tensor], device: torch.device,
              float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model inputs and targets of ``batch`` on ``device``; floating-point ones (images) cast
    to ``float_dtype`` for engines whose parameters are in that dtype (DeepSpeed bf16/fp16)."""
    out = {}
    for k, v in batch.items():
        if k not in BOOKKEEPING:
            dtype = float_dtype if float_dtype is not None and v.is_floating_point() else None
            out[k] = v.to(device, dtype=dtype, non_blocking=True)
    return out


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision not in LOW_PRECISION:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=LOW_PRECISION[precision])


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations in backward (non-reentrant)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"strategy.activation_checkpointing: {type(model).__name__} does not support it")
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class Strategy(ABC):
    name: str = "base"

    def __init__(self, cfg: RunConfig, info: DistInfo,
                 objective: Callable[[nn.Module, dict], torch.Tensor] | None = None):
        self.cfg = cfg
        self.info = info
        self.device = info.device
        self.model: nn.Module | None = None  # what forward runs on (possibly wrapped)
        # (model, batch on device) -> scalar loss: the task's (bigtrain/tasks)
        self.objective: Callable[[nn.Module, dict], torch.Tensor] = objective or causal_lm_loss
        self.input_dtype: torch.dtype | None = None  # see to_device

    # -- setup ---------------------------------------------------------------------------
    @abstractmethod
    def setup(self, model: nn.Module) -> None:
        """Move/wrap ``model`` and build the optimizer."""

    # -- one optimizer step ---------------------------------------------------------------
    @abstractmethod
    def forward_backward(self, batch: dict[str, torch.Tensor], scale: float, last_micro: bool) -> torch.Tensor:
        """``self.objective`` on one micro-batch: the loss (detached, unscaled); grads of
        ``loss * scale`` accumulated."""

    @abstractmethod
    def step(self, lr: float) -> torch.Tensor:
        """Clip (``train.grad_clip``), step with learning rate ``lr``, zero grads. Returns the
        pre-clip global gradient norm as a tensor (no host sync)."""

    def precision_context(self) -> contextlib.AbstractContextManager:
        """Where forward passes run: autocast for engines that do not cast parameters themselves."""
        return autocast(self.device, self.cfg.precision)

    def evaluate(self, batch: dict[str, torch.Tensor], stats: Callable[[nn.Module, dict],
                                                                       torch.Tensor]) -> torch.Tensor:
        """``stats(model, batch on device)`` without gradients (every rank calls: sharded engines
        run collective forwards)."""
        assert self.model is not None
        with torch.no_grad(), self.precision_context():
            return stats(self.model, to_device(batch, self.device, self.input_dtype))

    def train_mode(self, training: bool) -> None:
        assert self.model is not None
        self.model.train(training)

    # -- checkpoints ----------------------------------------------------------------------
    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write this engine's model + optimizer state into ``directory`` (every rank calls)."""

    @abstractmethod
    def load(self, directory: Path) -> None:
        """Restore what :meth:`save` wrote (every rank calls)."""

    @abstractmethod
    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The full, unsharded model state dict on CPU (collective; meaningful on rank 0)."""

    @abstractmethod
    def generation_model(self) -> nn.Module:
        """A module that can run ``generate``-style forward passes (may gather shards)."""

    def details(self) -> str:
        """What the engine really built, for the run header (read from the objects, not the config)."""
        optimizer = getattr(self, "optimizer", None)
        return f"optimizer {type(optimizer).__name__}" if optimizer is not None else ""

    def close(self) -> None:
        """Release what the engine holds beyond its Python references (hooks, threads), so the
        model and its process groups are freed before the interpreter exits. Idempotent."""

    # -- reporting ------------------------------------------------------------------------
    def memory_report(self) -> dict[str, Any]:
        """Bytes this rank holds, by kind. Engines override to name what they really hold."""
        return {}

"""The one interface every engine implements. ``train.py`` talks only to this.

A strategy owns: wrapping the model, building the optimizer, mixed precision, the
forward/backward of a micro-batch (including gradient-accumulation sync), clipping and the
optimizer step, saving/loading its part of a checkpoint, and reporting memory.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.config import RunConfig
from bigtrain.dist import DistInfo


def causal_lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (computed in fp32)."""
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations in backward (non-reentrant)."""
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class Strategy(ABC):
    name: str = "base"

    def __init__(self, cfg: RunConfig, info: DistInfo):
        self.cfg = cfg
        self.info = info
        self.device = info.device
        self.model: nn.Module | None = None  # what forward runs on (possibly wrapped)

    # -- setup ---------------------------------------------------------------------------
    @abstractmethod
    def setup(self, model: nn.Module) -> None:
        """Move/wrap ``model`` and build the optimizer."""

    # -- one optimizer step ---------------------------------------------------------------
    @abstractmethod
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, scale: float, last_micro: bool) -> torch.Tensor:
        """Loss of one micro-batch (detached, unscaled); grads of ``loss * scale`` accumulated."""

    @abstractmethod
    def step(self, lr: float) -> torch.Tensor:
        """Clip (``train.grad_clip``), step with learning rate ``lr``, zero grads. Returns the
        pre-clip global gradient norm as a tensor (no host sync)."""

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert self.model is not None
        with autocast(self.device, self.cfg.precision):
            return causal_lm_loss(self.model, x.to(self.device), y.to(self.device))

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

    # -- reporting ------------------------------------------------------------------------
    def memory_report(self) -> dict[str, Any]:
        """Bytes this rank holds, by kind. Engines override to name what they really hold."""
        return {}

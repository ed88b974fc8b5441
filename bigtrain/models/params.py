"""Sizes of parameters, also where ZeRO-3 built them partitioned (``deepspeed.zero.Init`` leaves an
empty local tensor and keeps the full size in ``ds_numel`` / ``ds_shape``)."""

from __future__ import annotations

import torch
from torch import nn


def numel(p: torch.Tensor) -> int:
    """The parameter's full element count."""
    return getattr(p, "ds_numel", None) or p.numel()


def shape(p: torch.Tensor) -> torch.Size:
    """The parameter's full shape."""
    return getattr(p, "ds_shape", None) or p.shape


def param_count(model: nn.Module, trainable: bool = False) -> int:
    """Parameters of ``model`` (``trainable``: those that require gradients), each counted once."""
    return sum(numel(p) for p in model.parameters() if p.requires_grad or not trainable)

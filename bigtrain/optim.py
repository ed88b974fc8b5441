"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from bigtrain.config import OptimSection, ScheduleSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (weights, embeddings); never biases or norm gains."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_kwargs(cfg: OptimSection, params: Iterable[torch.Tensor] = ()) -> dict:
    """AdamW hyper-parameters, choosing the fused kernel when every parameter supports it."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    impl = cfg.implementation
    if impl == "auto":
        devices = {p.device.type for p in params}
        impl = "fused" if devices and devices <= {"cuda", "cpu"} else "foreach"
    if impl == "fused":
        kwargs["fused"] = True
    elif impl == "foreach":
        kwargs["foreach"] = True
    else:
        kwargs["foreach"] = False
    return kwargs


def build_adamw(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    return torch.optim.AdamW(groups, **adamw_kwargs(cfg, params))


def lr_at(step: int, max_steps: int, base_lr: float, cfg: ScheduleSection) -> float:
    """Linear warmup over ``warmup_steps``, then cosine/linear decay to ``min_lr_ratio * base_lr``."""
    if step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return base_lr
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.decay == "cosine" else 1 - progress
    return base_lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)

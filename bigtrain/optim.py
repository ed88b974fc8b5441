"""Optimizers and the learning-rate schedule: one builder for every engine.

``build_optimizer`` makes ``optim.name``'s optimizer over :func:`param_groups` for single/ddp
(plain tensors), fsdp (DTensor shards) and deepspeed (the client optimizer, which ZeRO hands its
flat fp32 partitions). What each optimizer is, and where an engine changes its math:

- adamw: ``torch.optim.AdamW`` (fused on single/ddp where supported, else foreach). ZeRO-Offload
  (``strategy.deepspeed.offload_*``) steps DeepSpeed's CPU Adam instead: only adamw can offload.
- sgd, rmsprop: ``torch.optim.SGD`` / ``RMSprop``; weight decay is L2 added to the gradient.
- lion: ``lion_pytorch.Lion`` (elementwise; works on DTensor shards as it is).
- adafactor: ``transformers.Adafactor`` with the run's schedule (``relative_step=False,
  scale_parameter=False, warmup_init=False``). On fsdp its factored row/column statistics are
  DTensors (:class:`DTensorAdafactor`), so it computes what the single process does. Under
  DeepSpeed ZeRO (1-3) it sees flat 1-D partitions: the second moment is not factored (a full
  one, as Adam's) and the update is clipped by the RMS of the whole partition, not of each
  parameter; the math then depends on the ZeRO partitioning (and so on the world size).

SGD, RMSprop, Lion and AdamW are elementwise: flat partitions and shards change nothing.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable

import torch
from lion_pytorch import Lion
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from transformers.optimization import Adafactor

from bigtrain.config import OptimSection, ScheduleSection
from bigtrain.models.params import shape


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (weights, embeddings); never biases or norm gains."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # the full shape: ZeRO-3 may have built the parameter partitioned (zero.Init)
            (decay if len(shape(p)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _kernel(cfg: OptimSection, devices: Collection[str]) -> dict:
    """The torch kernel: fused, foreach or the for-loop; auto: fused when ``devices`` all support it."""
    impl = cfg.implementation
    if impl == "auto":
        fused_ok = cfg.name in ("adamw", "sgd") and devices and set(devices) <= {"cuda", "cpu"}
        impl = "fused" if fused_ok else "foreach"
    if impl == "fused":
        return {"fused": True}
    return {"foreach": impl == "foreach"}


def adamw_kwargs(cfg: OptimSection, params: Iterable[torch.Tensor] = ()) -> dict:
    """AdamW hyper-parameters, choosing the fused kernel when every parameter supports it."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    return {**kwargs, **_kernel(cfg, {p.device.type for p in params})}


def build_optimizer(groups: list[dict], cfg: OptimSection, devices: Collection[str] = ()) -> torch.optim.Optimizer:
    """``cfg.name``'s optimizer over ``groups`` (each with its own weight decay, see param_groups).

    ``devices``: the device types of the parameters where a fused kernel may step them (plain
    tensors); empty where the engine gives the optimizer DTensor shards or ZeRO partitions, so
    ``implementation: auto`` takes foreach there.
    """
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                 **_kernel(cfg, devices))
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               **_kernel(cfg, devices))
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum,
                                   centered=cfg.centered, **_kernel(cfg, devices))
    if cfg.name == "lion":
        return Lion(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if cfg.name == "adafactor":
        params = [p for g in groups for p in g["params"]]
        cls = DTensorAdafactor if any(isinstance(p, DTensor) for p in params) else Adafactor
        return cls(groups, lr=cfg.lr, beta1=cfg.adafactor_beta1, decay_rate=cfg.decay_rate,
                   clip_threshold=cfg.clip_threshold, relative_step=False, scale_parameter=False,
                   warmup_init=False)
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}")


class DTensorAdafactor(Adafactor):
    """transformers' Adafactor over FSDP's DTensor shards, computing the single process's math.

    transformers creates the factored statistics as plain tensors, which DTensor gradients cannot
    be added to: they are created here as DTensors before a parameter's first step (row statistics
    sharded as the parameter's rows; column statistics, a mean over the sharded rows, reduced and
    replicated). RMS values (update clipping) are reduced to plain scalars.
    """

    @staticmethod
    def _rms(tensor):
        rms = tensor.norm(2) / (tensor.numel() ** 0.5)
        return rms.full_tensor() if isinstance(rms, DTensor) else rms

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or self.state[p] or not isinstance(p.grad, DTensor) or p.grad.dim() < 2:
                    continue
                zeros = torch.zeros_like(p.grad, dtype=torch.float32)
                state = self.state[p]
                state["step"], state["RMS"] = 0, 0
                if group["beta1"] is not None:
                    state["exp_avg"] = zeros.clone()
                state["exp_avg_sq_row"] = _replicate_partial(zeros.mean(dim=-1))
                state["exp_avg_sq_col"] = _replicate_partial(zeros.mean(dim=-2))
        return super().step(closure)


def _replicate_partial(t: DTensor) -> DTensor:
    """``t`` with its pending reductions (partial placements) done: replicated there."""
    return t.redistribute(t.device_mesh, [Replicate() if p.is_partial() else p for p in t.placements])


def lr_at(step: int, max_steps: int, base_lr: float, cfg: ScheduleSection) -> float:
    """The learning rate of (0-based) ``step``: a pure function of the step, so resume is exact.

    Linear warmup over ``warmup_steps`` from 0, then cosine/linear decay to ``min_lr_ratio *
    base_lr``, constant, or step (x ``gamma`` every ``step_size`` steps). onecycle: linear from
    ``base_lr / div_factor`` at step 0 to ``base_lr`` at the end of its warmup (``round(pct_start *
    max_steps)`` steps, default ``warmup_steps``), then cosine to ``base_lr / final_div_factor``.
    """
    if cfg.decay == "onecycle":
        warmup = cfg.warmup_steps if cfg.pct_start is None else round(cfg.pct_start * max_steps)
        start, end = base_lr / cfg.div_factor, base_lr / cfg.final_div_factor
        if step < warmup:
            return start + (base_lr - start) * step / warmup
        return end + (base_lr - end) * _cosine(step, warmup, max_steps)
    if step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return base_lr
    if cfg.decay == "step":
        return base_lr * cfg.gamma ** ((step - cfg.warmup_steps) // cfg.step_size)
    if cfg.decay == "cosine":
        shape = _cosine(step, cfg.warmup_steps, max_steps)
    else:
        shape = 1 - _progress(step, cfg.warmup_steps, max_steps)
    return base_lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def _progress(step: int, warmup: int, max_steps: int) -> float:
    return min(1.0, (step - warmup) / max(1, max_steps - warmup))


def _cosine(step: int, warmup: int, max_steps: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * _progress(step, warmup, max_steps)))

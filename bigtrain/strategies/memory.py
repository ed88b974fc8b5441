"""Per-rank memory accounting shared by the engines."""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch
from torch import nn


def tensor_bytes(tensors) -> int:
    total, seen = 0, set()
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        key = (local.data_ptr(), local.numel())  # views into one flat buffer are distinct tensors
        if key in seen:
            continue
        seen.add(key)
        total += local.numel() * local.element_size()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values()
                        if isinstance(v, torch.Tensor) and v.dim() > 0)


def peak_bytes(device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(device)}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}


def report(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, Any]:
    params = list(model.parameters())
    return {
        "param_bytes": tensor_bytes(params),
        # Gradients are freed after each step (zero_grad(set_to_none=True)); what backward
        # materialises is one gradient per trainable parameter, of the parameter's size.
        "grad_bytes": tensor_bytes(p for p in params if p.requires_grad),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        **peak_bytes(device),
    }

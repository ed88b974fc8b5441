"""Model builders (one module per family) and what the runtime needs to know about any model."""

from __future__ import annotations

import torch
from torch import nn

from bigtrain.models.bert import build_masked_lm, build_sequence_classifier
from bigtrain.models.gpt import build_causal_lm, flops_per_token
from bigtrain.models.resnet import build_resnet

__all__ = ["batch_norms", "build_causal_lm", "build_masked_lm", "build_resnet", "build_sequence_classifier",
           "flops_per_token", "repeated_blocks", "training_flops"]

# Where each family keeps its repeated blocks, below the base model.
_BLOCK_PATHS = ("h", "layers", "encoder.layer", "encoder.stages")


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: transformer layers, ResNet stages (the unit of FSDP sharding)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), model)
    for path in _BLOCK_PATHS:
        blocks = base
        for attr in path.split("."):
            blocks = getattr(blocks, attr, None)
        if isinstance(blocks, nn.ModuleList):
            return list(blocks)
    raise ValueError(f"cannot find the repeated blocks of {type(model).__name__}")


def batch_norms(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers (engines keep their statistics in a dtype that works)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def training_flops(model: nn.Module, **inputs: torch.Tensor) -> float:
    """Training FLOPs (forward + backward, 3x the forward) on ``inputs``; the forward FLOPs are
    counted by torch's FlopCounterMode on the model as it is (run before it is wrapped)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    with torch.no_grad(), counter:
        model(**inputs)
    model.train(was_training)
    return 3.0 * counter.get_total_flops()

"""Cross-entropy (and the distillation KL) over a large vocabulary without keeping an fp32 copy of every logit.

``F.cross_entropy(logits.float(), labels)`` upcasts all logits (bf16 under mixed precision) and
keeps their fp32 log-softmax for backward: 4 bytes x tokens x vocabulary (a 16 x 1024-token
micro-batch over a 50k vocabulary: 3.3 GB). Above ``CHUNK_ELEMENTS`` logits, :func:`cross_entropy`
works through row chunks, each upcast, reduced and recomputed in backward
(``torch.utils.checkpoint``), so at most one chunk's fp32 copy lives at a time. Smaller ones take
the plain path (the same numbers, bit for bit, as before).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 26  # logits upcast at a time: 256 MB in fp32


def _summed(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=IGNORE_INDEX)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Mean cross-entropy in fp32 over the labelled tokens, as ``F.cross_entropy(logits.float()...)``;
    ``logits`` ``[..., vocab]``, ``labels`` ``[...]`` (``-100``: ignored)."""
    vocab = logits.size(-1)
    rows, labels = logits.reshape(-1, vocab), labels.reshape(-1)
    if rows.numel() <= chunk_elements:
        return F.cross_entropy(rows.float(), labels, ignore_index=IGNORE_INDEX)
    step = max(1, chunk_elements // vocab)
    total = sum(checkpoint(_summed, rows[i:i + step], labels[i:i + step], use_reentrant=False)
                for i in range(0, rows.size(0), step))
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def _kl_summed(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return (F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1) * weight).sum()


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float,
                    chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions, in fp32, averaged over the
    rows whose label is not ``-100`` (target tokens; samples) and scaled by ``temperature``² (Hinton
    et al.: the gradients keep their size as the temperature changes). ``student``, ``teacher``
    ``[..., classes]``, ``labels`` ``[...]``; chunked like :func:`cross_entropy` above ``chunk_elements``."""
    classes = student.size(-1)
    rows, targets = student.reshape(-1, classes), teacher.reshape(-1, classes)
    weight = (labels.reshape(-1) != IGNORE_INDEX).to(torch.float32)
    if rows.numel() <= chunk_elements:
        total = _kl_summed(rows, targets, weight, temperature)
    else:
        step = max(1, chunk_elements // classes)
        total = sum(checkpoint(_kl_summed, rows[i:i + step], targets[i:i + step], weight[i:i + step], temperature,
                               use_reentrant=False) for i in range(0, rows.size(0), step))
    return total / weight.sum().clamp(min=1) * temperature ** 2

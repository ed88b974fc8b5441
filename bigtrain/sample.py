"""Text sampling from the model being trained (top-k, temperature), identical on every rank."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bigtrain.config import RunConfig
from bigtrain.data.tokenizer import AnyTokenizer
from bigtrain.strategies.base import autocast


@torch.no_grad()
def sample_ids(strategy, cfg: RunConfig, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = (),
               temperature: float = 0.8, top_k: int = 50) -> list[int]:
    """The tokens sampled after ``ids`` (up to ``max_new_tokens``; the first of ``stop_ids``
    sampled ends it and is included). Every rank must call (sharded engines run collective
    forwards); all ranks get the same tokens."""
    model = strategy.generation_model()
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.tensor([list(ids)], device=strategy.device)
    context = cfg.model.max_seq_len or cfg.train.seq_len
    for _ in range(max_new_tokens):
        with autocast(strategy.device, cfg.precision):
            logits = model(input_ids=x[:, -context:]).logits[0, -1].float().cpu()
        logits /= temperature
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits[logits < kth] = -float("inf")
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
        x = torch.cat([x, nxt.to(x.device).view(1, 1)], dim=1)
        if int(nxt) in stop_ids:
            break
    model.train(was_training)
    return x[0, len(ids):].tolist()


def sample_text(strategy, tokenizer: AnyTokenizer, cfg: RunConfig, prompt: str, max_new_tokens: int) -> str:
    """Text sampled after ``prompt`` (see :func:`sample_ids`)."""
    return tokenizer.decode(sample_ids(strategy, cfg, tokenizer.encode(prompt) or [tokenizer.eos_id], max_new_tokens))

"""BERT masked-LM batches, masked on the fly.

:func:`mask_tokens` picks 15% of the non-special tokens (or of the words, with whole-word
masking); of those, 80% become ``<mask>``, 10% a random non-special token and 10% stay; labels
are the original ids there and -100 elsewhere. :class:`MaskedLMStream` packs the prepared token
shards like the causal-LM reader and masks each sample with a generator seeded by (seed,
position), so a resumed or resharded run masks exactly the same tokens.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from bigtrain.data.shards import PreparedData
from bigtrain.data.stream import CausalLMStream
from bigtrain.data.tokenizer import SPECIAL_PIECES, Tokenizer

IGNORE = -100


def word_tables(tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token id: does its piece start a word (leading ``▁``), does it end one (a newline or a
    trailing ``▁``)? The tokenizer keeps spaces as ``▁`` and newlines as their own piece."""
    pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    starts = torch.tensor([p.startswith("\u2581") for p in pieces])
    ends = torch.tensor([p == "\n" or p.endswith("\u2581") for p in pieces])
    return starts, ends


def word_ids(input_ids: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Per position, the index of its word within the row."""
    begin = starts[input_ids].clone()
    begin[..., 1:] |= ends[input_ids[..., :-1]]
    begin[..., 0] = True
    return torch.cumsum(begin.long(), dim=-1) - 1


def mask_tokens(input_ids: torch.Tensor, generator: torch.Generator, mask_id: int, vocab_size: int,
                special_ids: Sequence[int], prob: float = 0.15,
                words: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask one row (1-D) of token ids; ``words`` (from :func:`word_ids`) masks whole words."""
    special = torch.isin(input_ids, torch.tensor(list(special_ids)))
    if words is None:
        chosen = (torch.rand(input_ids.shape, generator=generator) < prob) & ~special
    else:
        picked = torch.rand(int(words.max()) + 1, generator=generator) < prob
        chosen = picked[words] & ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    roll = torch.rand(input_ids.shape, generator=generator)
    inputs = input_ids.clone()
    inputs[chosen & (roll < 0.8)] = mask_id
    randomize = chosen & (roll >= 0.8) & (roll < 0.9)
    candidates = torch.tensor([i for i in range(vocab_size) if i not in set(special_ids)])
    picks = candidates[torch.randint(len(candidates), input_ids.shape, generator=generator)]
    inputs[randomize] = picks[randomize]
    return inputs, labels


class MaskedLMStream(CausalLMStream):
    """``{"input_ids", "labels", "attention_mask", "sample", "position"}`` for masked-LM training."""

    def __init__(self, sources: Sequence[PreparedData], seq_len: int, global_batch: int, micro_batch: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, mask_prob: float = 0.15,
                 whole_word: bool = False, **kw: Any):
        super().__init__(sources, seq_len, global_batch, micro_batch, rank, world_size, seed, **kw)
        tok = Tokenizer.load(sources[0].tokenizer_path)
        self.mask_prob, self.whole_word = mask_prob, whole_word
        self.mask_id, self.vocab_size = tok.piece_id("<mask>"), tok.vocab_size
        self.special_ids = sorted({tok.sp.unk_id(), tok.sp.bos_id(), tok.eos_id, tok.pad_id,
                                   *(tok.piece_id(p) for p in SPECIAL_PIECES)})
        self.tables = word_tables(tok) if whole_word else None

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "mask_prob": self.mask_prob, "whole_word": self.whole_word}

    def build(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        base = super().build(positions)
        rows = torch.cat([base["input_ids"][:, :1], base["labels"]], dim=1)[:, : self.seq_len]
        inputs, labels = [], []
        for row, position in zip(rows, positions):
            gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(position))
            words = word_ids(row, *self.tables) if self.tables else None
            x, y = mask_tokens(row, gen, self.mask_id, self.vocab_size, self.special_ids, self.mask_prob, words)
            inputs.append(x)
            labels.append(y)
        return {"input_ids": torch.stack(inputs), "labels": torch.stack(labels),
                "attention_mask": torch.ones_like(rows), "sample": base["sample"], "position": base["position"]}

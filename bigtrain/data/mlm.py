"""BERT masked-LM batches, masked on the fly.

:func:`mask_tokens` picks 15% of the non-special tokens (or of the words, with whole-word
masking); of those, 80% become ``<mask>``, 10% a random non-special token and 10% stay; labels
are the original ids there and -100 elsewhere. :class:`MaskedLMStream` packs the prepared token
shards like the causal-LM reader (without the shift: inputs and labels are aligned) and masks
each sample with a generator seeded by (seed, position), so a resumed or resharded run masks
exactly the same tokens.

Words, for whole-word masking with our SentencePiece models (no dummy prefix, spaces kept as
``▁``, ``\\n`` its own piece): a piece starts a word if it begins with ``▁`` or is whitespace
(all ``▁``, ``\\n``, or a byte-fallback piece of an ASCII whitespace byte); a whitespace piece
also ends its word, so the piece after it starts the next one (the first word of a line has no
``▁``). Whitespace pieces are thus words of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bigtrain.data.errors import DataError
from bigtrain.data.shards import PreparedData
from bigtrain.data.stream import CausalLMStream
from bigtrain.data.tokenizer import SPECIAL_PIECES, AnyTokenizer, HFTokenizer, load_tokenizer

IGNORE = -100
_WHITESPACE_BYTES = {f"<0x{b:02X}>" for b in b" \t\n\r\x0b\x0c"}


def _is_whitespace_piece(piece: str) -> bool:
    return piece in _WHITESPACE_BYTES or (piece != "" and piece.strip("\u2581\n") == "")


def word_tables(tokenizer: AnyTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token id (BoolTensor[vocab] each): does its piece start a word, does it end one?
    SentencePiece: see the module docstring; WordPiece (BERT checkpoints): a piece without the
    ``##`` continuation prefix starts a word."""
    if isinstance(tokenizer, HFTokenizer):
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        pieces = [""] * tokenizer.vocab_size
        for piece, i in vocab.items():
            pieces[i] = piece
        if not any(p.startswith("##") for p in pieces):
            raise DataError(f"{tokenizer.directory}: data.whole_word_mask needs a WordPiece tokenizer (## marks "
                            f"word continuations) or bigtrain's SentencePiece")
        starts = torch.tensor([not p.startswith("##") for p in pieces])
        return starts, torch.zeros_like(starts)
    pieces = tokenizer.word_starts()
    ends = torch.tensor([_is_whitespace_piece(p) for p in pieces])
    starts = torch.tensor([p.startswith("\u2581") for p in pieces]) | ends
    return starts, ends


def word_ids(input_ids: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Per position, the index of its word within the row (tables from :func:`word_tables`)."""
    begin = starts[input_ids].clone()
    begin[..., 1:] |= ends[input_ids[..., :-1]]
    begin[..., 0] = True
    return torch.cumsum(begin.long(), dim=-1) - 1


def mask_generator(seed: int, position: int) -> torch.Generator:
    """The generator that masks the sample at ``position`` (independent streams per (seed, position))."""
    state = np.random.SeedSequence([int(seed), int(position), 4]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def mask_tokens(input_ids: torch.Tensor, generator: torch.Generator, mask_id: int, vocab_size: int,
                special_ids: Sequence[int], prob: float = 0.15,
                words: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask one row (1-D LongTensor) of token ids; returns ``(inputs, labels)``.

    ``words`` (per-position word index, non-decreasing, e.g. from :func:`word_ids`) switches to
    whole-word masking: each word is chosen with probability ``prob`` and then masked in full
    (its special tokens excepted). The draws depend only on the row and ``generator``.
    """
    special_ids = torch.as_tensor(list(special_ids), dtype=torch.long)
    special = torch.isin(input_ids, special_ids)
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
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special_ids[(special_ids >= 0) & (special_ids < vocab_size)]] = False
    candidates = allowed.nonzero().squeeze(1)
    n = int(randomize.sum())
    inputs[randomize] = candidates[torch.randint(len(candidates), (n,), generator=generator)]
    return inputs, labels


class MaskedLMStream(CausalLMStream):
    """``{"input_ids", "labels", "attention_mask", "sample", "position"}`` for masked-LM training.

    Sample ``i`` is the token window ``[i*L, i*L + L)`` of the packed train split (documents
    back to back, separated by EOS, which like every special token is never masked).
    """

    def __init__(self, sources: Sequence[PreparedData], seq_len: int, global_batch: int, micro_batch: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, mask_prob: float = 0.15,
                 whole_word: bool = False, **kw: Any):
        super().__init__(sources, seq_len, global_batch, micro_batch, rank, world_size, seed, **kw)
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        tok = load_tokenizer(sources[0].tokenizer_path)
        try:
            self.mask_id, self.special_ids = tok.masking_ids()
        except KeyError as err:
            raise DataError(f"{sources[0].tokenizer_path}: {err.args[0]} (masked-LM needs a mask token: bigtrain's "
                            f"SentencePiece has {', '.join(SPECIAL_PIECES)}; a BERT checkpoint's tokenizer its "
                            f"[MASK])") from None
        self.mask_prob, self.whole_word, self.vocab_size = mask_prob, whole_word, tok.vocab_size
        self.tables = word_tables(tok) if whole_word else None

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "task": "mlm", "mask_prob": self.mask_prob, "whole_word": self.whole_word}

    def build(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        base = super().build(positions)
        rows = base["input_ids"]  # window[:L]: no shift for masked-LM
        inputs, labels = [], []
        for row, position in zip(rows, positions):
            words = word_ids(row, *self.tables) if self.tables is not None else None
            x, y = mask_tokens(row, mask_generator(self.seed, int(position)), self.mask_id, self.vocab_size,
                               self.special_ids, self.mask_prob, words)
            inputs.append(x)
            labels.append(y)
        return {"input_ids": torch.stack(inputs), "labels": torch.stack(labels),
                "attention_mask": torch.ones_like(rows), "sample": base["sample"], "position": base["position"]}

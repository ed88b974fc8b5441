"""Shard writing: documents -> a tokenizer's ids -> ``train-NNNNN.bin`` / ``val-NNNNN.bin``.

Each document is encoded and followed by the tokenizer's EOS id; the resulting token stream is
cut into blocks of :data:`VAL_BLOCK_TOKENS`, every k-th block (k = 1 / val_fraction, starting in
the middle of the first k) goes to the val split and the others to train, and each split is cut
into shards of at most ``shard_tokens`` tokens (format: :mod:`bigtrain.data.shards`). Every shard
is hashed as it is written, never read back, and the val split's token counts are kept on the
way for its unigram entropy. Torch-free.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from bigtrain.data.shards import token_dtype
from bigtrain.data.tokenizer import AnyTokenizer

VAL_BLOCK_TOKENS = 4096  # the token stream is cut into blocks; every k-th block is held out
ENCODE_BATCH_CHARS = 8_000_000  # documents are encoded in batches of about this many characters


def is_val_block(index: int, fraction: float) -> bool:
    """Every k-th block (k = 1/fraction), starting in the middle of the first k: spread evenly."""
    k = max(2, round(1 / fraction))
    return index % k == k // 2


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy (nats) of the unigram distribution with these per-token-id ``counts``: what a model
    that ignores context would achieve at best on those tokens."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class ShardWriter:
    """Appends tokens to ``<split>-NNNNN.bin`` files of at most ``shard_tokens`` tokens. :attr:`shards`
    lists them as the manifest does: ``{"file", "split", "tokens", "bytes", "sha256"}`` (the last
    two once the shard is closed)."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._fh: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._count = 0

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._fh = open(self.root / name, "wb")
        self._hash = hashlib.sha256()
        self.shards.append({"file": name, "split": self.split, "tokens": 0})
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._fh is None or self._count >= self.shard_tokens:
                self._open_next()
            take = min(len(tokens), self.shard_tokens - self._count)
            chunk = np.ascontiguousarray(tokens[:take].astype(self.dtype, copy=False))
            chunk.tofile(self._fh)
            self._hash.update(chunk)
            self._count += take
            self.shards[-1]["tokens"] += take
            tokens = tokens[take:]

    def close(self) -> None:
        """Flush, fsync and close the open shard, and record its size and sha256."""
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
            shard = self.shards[-1]
            shard["bytes"] = (self.root / shard["file"]).stat().st_size
            shard["sha256"] = self._hash.hexdigest()


@dataclass
class WrittenShards:
    """What :func:`write_shards` wrote: the shards (train, then val) and counts for the manifest."""

    shards: list[dict[str, Any]]
    documents: int
    val_counts: np.ndarray = field(repr=False)  # occurrences of each token id in the val split

    def tokens(self, split: str) -> int:
        return sum(s["tokens"] for s in self.shards if s["split"] == split)


def _batched(docs: Iterable[str], max_chars: int = ENCODE_BATCH_CHARS) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _add_counts(total: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    counts = np.bincount(tokens)
    if len(counts) > len(total):
        total = np.pad(total, (0, len(counts) - len(total)))
    total[:len(counts)] += counts
    return total


def write_shards(documents: Iterable[str], tokenizer: AnyTokenizer, root: Path, val_fraction: float,
                 shard_tokens: int, threads: int = 1) -> WrittenShards:
    """Encode ``documents`` (one pass) into token shards in directory ``root``."""
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: ShardWriter(root, s, dtype, shard_tokens) for s in ("train", "val")}
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    val_counts = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    pending = np.empty(0, dtype=np.int64)
    block = n_docs = 0

    def flush(tokens: np.ndarray, final: bool) -> np.ndarray:
        nonlocal block, val_counts
        while len(tokens) >= VAL_BLOCK_TOKENS or (final and len(tokens)):
            chunk, tokens = tokens[:VAL_BLOCK_TOKENS], tokens[VAL_BLOCK_TOKENS:]
            split = "val" if is_val_block(block, val_fraction) else "train"
            writers[split].write(chunk)
            if split == "val":
                val_counts = _add_counts(val_counts, chunk)
            block += 1
        return tokens

    for batch in _batched(documents):
        encoded = tokenizer.encode_batch(batch, threads=threads)
        n_docs += len(encoded)
        flat = np.concatenate([np.concatenate([np.asarray(ids, dtype=np.int64), eos]) for ids in encoded])
        pending = flush(np.concatenate([pending, flat]), final=False)
    flush(pending, final=True)
    for w in writers.values():
        w.close()
    return WrittenShards(writers["train"].shards + writers["val"].shards, n_docs, val_counts)

"""Batches of packed token sequences for causal-LM training, read from memory-mapped shards.

The train split is one token stream (shards concatenated). Sample ``i`` is the window
``stream[i*L : i*L + L + 1]`` (inputs are its first L tokens, targets its last L). Each epoch
visits every sample once in an order drawn from (seed, epoch). Optimizer step ``s`` consumes the
global samples ``[s*B, (s+1)*B)`` of that order, split evenly over ranks and micro-batches, so
any world size sees the same global batch and resuming at step ``s`` is a seek, not a replay.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from bigtrain.data.shards import PreparedData


class TokenStream:
    """Random access to ``length``-token windows of a split's concatenated shards."""

    def __init__(self, data: PreparedData, split: str):
        self.maps = data.memmaps(split)
        sizes = np.array([len(m) for m in self.maps], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.total = int(self.starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start - int(self.starts[shard])
        while filled < length:
            m = self.maps[shard]
            take = min(length - filled, len(m) - pos)
            out[filled : filled + take] = m[pos : pos + take]
            filled += take
            shard, pos = shard + 1, 0
        return out


class PackedBatches:
    """Deterministic, rank-aware, seekable batches for causal-LM training."""

    def __init__(self, data: PreparedData, seq_len: int, global_batch: int, micro_batch: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, split: str = "train"):
        self.stream = TokenStream(data, split)
        self.seq_len, self.global_batch, self.micro_batch = seq_len, global_batch, micro_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_samples = (self.stream.total - 1) // seq_len
        if self.num_samples < 1:
            raise ValueError(f"{split} split has {self.stream.total} tokens, fewer than train.seq_len + 1")
        self.per_rank = global_batch // world_size
        self.accum = self.per_rank // micro_batch
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _sample_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._order = rng.permutation(self.num_samples)
            self._order_epoch = epoch
        return self._order

    def sample_ids(self, step: int, micro: int) -> np.ndarray:
        """Global sample ids this rank reads for micro-batch ``micro`` of optimizer step ``step``."""
        first = step * self.global_batch + self.rank * self.per_rank + micro * self.micro_batch
        positions = np.arange(first, first + self.micro_batch)
        epochs, offsets = np.divmod(positions, self.num_samples)
        return np.array([self._sample_order(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.num_samples

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.sample_ids(step, micro)
        rows = np.stack([self.stream.window(int(i) * self.seq_len, self.seq_len + 1) for i in ids])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]


def eval_batches(data: PreparedData, seq_len: int, batch_size: int, max_batches: int,
                 rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``max_batches`` x world_size sequential val batches; this rank's share of them."""
    stream = TokenStream(data, "val")
    n = (stream.total - 1) // seq_len
    per_batch = batch_size * world_size
    usable = min(max_batches, n // per_batch) if n >= per_batch else 0
    if usable == 0:  # fewer val sequences than one global batch: every rank sees them all
        ids_list = [np.arange(min(n, batch_size))] if n else []
    else:
        ids_list = [np.arange(b * per_batch + rank * batch_size, b * per_batch + (rank + 1) * batch_size)
                    for b in range(usable)]
    for ids in ids_list:
        rows = np.stack([stream.window(int(i) * seq_len, seq_len + 1) for i in ids])
        t = torch.from_numpy(rows)
        yield t[:, :-1], t[:, 1:]

"""The global sample order: which sample the reader yields at every position of the run.

Positions count samples from the start of training, across epochs: position ``p`` lies in epoch
``p // N``. Every rank, every dataloader worker and every world size computes the same order, and
computing the sample at any position costs O(shuffle_buffer + chunks), independent of the
position, so resuming is a seek, never a replay.

Shuffling is two-level, like MosaicML Streaming's: the N samples are cut into contiguous
*chunks* (about one shard each) whose order is drawn from (seed, epoch); the resulting sequence
is cut into *blocks* of ``shuffle_buffer`` samples, each permuted by (seed, epoch, block). A
block therefore reads from few shards (locality), while the chunk order changes every epoch.

A :class:`Mixture` interleaves several sources by weight with the same properties. Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(list(key)))


class SampleOrder:
    """Position -> sample id for one source of ``num_samples`` samples."""

    def __init__(self, num_samples: int, seed: int, chunk_size: int | None = None,
                 shuffle_buffer: int = 16384, shuffle: bool = True):
        if num_samples < 1:
            raise ValueError("a sample order needs at least one sample")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.chunk_size = max(1, min(chunk_size or num_samples, num_samples))
        self.shuffle_buffer = max(1, shuffle_buffer)
        self._epoch = -1
        self._chunk_perm = self._chunk_starts = self._chunk_sizes = np.empty(0, dtype=np.int64)
        self._block: tuple[int, int] = (-1, -1)
        self._block_perm = np.empty(0, dtype=np.int64)

    def _set_epoch(self, epoch: int) -> None:
        if epoch == self._epoch:
            return
        n_chunks = math.ceil(self.num_samples / self.chunk_size)
        perm = _rng(self.seed, epoch, 0).permutation(n_chunks)
        sizes = np.minimum(self.chunk_size, self.num_samples - perm * self.chunk_size)
        self._chunk_perm, self._chunk_sizes = perm, sizes
        self._chunk_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self._epoch = epoch

    def _block_permutation(self, epoch: int, block: int) -> np.ndarray:
        if self._block != (epoch, block):
            length = min(self.shuffle_buffer, self.num_samples - block * self.shuffle_buffer)
            self._block_perm = _rng(self.seed, epoch, 1, block).permutation(length)
            self._block = (epoch, block)
        return self._block_perm

    def sample_at(self, position: int) -> int:
        epoch, offset = divmod(int(position), self.num_samples)
        if not self.shuffle:
            return offset
        self._set_epoch(epoch)
        block, within = divmod(offset, self.shuffle_buffer)
        shuffled = block * self.shuffle_buffer + int(self._block_permutation(epoch, block)[within])
        chunk = int(np.searchsorted(self._chunk_starts, shuffled, side="right")) - 1
        return int(self._chunk_perm[chunk]) * self.chunk_size + shuffled - int(self._chunk_starts[chunk])

    def samples(self, start: int, count: int) -> np.ndarray:
        return np.fromiter((self.sample_at(p) for p in range(start, start + count)), dtype=np.int64, count=count)


class Mixture:
    """Interleave sources by weight: position -> (source index, position within that source).

    Positions are grouped into blocks of ``block`` samples; each block holds a fixed number of
    samples of every source (largest remainder of ``weight * block``) in an order drawn from
    (seed, block index). Each source then advances through its own :class:`SampleOrder`, with
    its own epochs (a small source with a large weight is repeated more often).
    """

    def __init__(self, weights: Sequence[float], seed: int, block: int = 1000):
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixture weights must be non-negative with a positive sum, got {list(weights)}")
        exact = w / w.sum() * block
        counts = np.floor(exact).astype(np.int64)
        for i in np.argsort(-(exact - counts), kind="stable")[: block - counts.sum()]:
            counts[i] += 1
        self.counts, self.block, self.seed = counts, block, seed
        self._labels = np.repeat(np.arange(len(counts)), counts)
        self._cached = (-1, np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))

    def _block_layout(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cached[0] != index:
            labels = self._labels[_rng(self.seed, index, 2).permutation(self.block)]
            rank_within = np.empty(self.block, dtype=np.int64)
            for src in range(len(self.counts)):
                hits = labels == src
                rank_within[hits] = np.arange(int(hits.sum()))
            self._cached = (index, labels, rank_within)
        return self._cached[1], self._cached[2]

    def locate(self, position: int) -> tuple[int, int]:
        index, within = divmod(int(position), self.block)
        labels, rank_within = self._block_layout(index)
        src = int(labels[within])
        return src, index * int(self.counts[src]) + int(rank_within[within])

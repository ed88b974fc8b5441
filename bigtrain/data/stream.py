"""Streaming readers: rank- and worker-partitioned, deterministic, resumable exactly.

Every reader is a :class:`PositionalStream`: the run is one global sequence of sample
*positions* (see :mod:`bigtrain.data.order`), and optimizer step ``s`` consumes the positions
``[start + s*B, start + (s+1)*B)`` (B = global batch), split over ranks and then micro-batches::

    rank r, micro-batch m of step s  ->  start + s*B + r*(B/world) + m*micro ... + micro

The reader is a ``torch.utils.data.IterableDataset`` yielding this rank's micro-batches in
order; dataloader worker ``w`` of ``W`` builds micro-batches ``w, w+W, w+2W, ...`` and the
DataLoader interleaves them back in order. The state is one number, the position of the next
step's first sample: resuming is a seek, and any world size (or global batch) continues the same
sample sequence. :class:`StatefulLoader` wraps the DataLoader in the training process and
tracks that position.

Subclasses say how to build a batch from positions; :class:`CausalLMStream` packs token windows.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bigtrain.data.errors import DataError
from bigtrain.data.order import Mixture, SampleOrder
from bigtrain.data.shards import PreparedData

STATE_VERSION = 1


class PositionalStream(IterableDataset):
    """Base: maps this rank's micro-batch index to global positions; subclasses build batches."""

    def __init__(self, global_batch: int, micro_batch: int, rank: int = 0, world_size: int = 1):
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global batch {global_batch} is not a multiple of micro batch {micro_batch} "
                             f"x world size {world_size}")
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size = rank, world_size
        self.per_rank = global_batch // world_size
        self.accum = self.per_rank // micro_batch
        self.start = 0  # position of the first sample of the first step this reader yields

    # -- what subclasses provide ------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """What the positions mean (data identity, seed, sample length): stored with the state."""
        raise NotImplementedError

    def build(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        """The batch for these global positions."""
        raise NotImplementedError

    def epoch_of(self, position: int) -> float:
        """Epochs consumed by ``position`` samples (subclasses define ``num_samples``)."""
        return position / self.num_samples

    # -- positions ----------------------------------------------------------------------------
    def positions(self, index: int) -> np.ndarray:
        """Global positions of this rank's ``index``-th micro-batch (counted from ``start``)."""
        step, micro = divmod(index, self.accum)
        first = self.start + step * self.global_batch + self.rank * self.per_rank + micro * self.micro_batch
        return np.arange(first, first + self.micro_batch, dtype=np.int64)

    def micro_batch_at(self, index: int) -> dict[str, torch.Tensor]:
        return self.build(self.positions(index))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for index in itertools.count(worker, workers):
            yield self.micro_batch_at(index)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self, steps_done: int = 0) -> dict[str, Any]:
        return {"version": STATE_VERSION, "position": self.start + steps_done * self.global_batch,
                "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data reader state: unsupported version {state.get('version')!r}")
        saved, current = state["fingerprint"], self.fingerprint()
        diffs = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in sorted(set(saved) | set(current))
                 if saved.get(k) != current.get(k)]
        if diffs:
            raise DataError("the checkpoint's data reader read different data (" + "; ".join(diffs)
                            + "); resume with the same data, or start fresh (checkpoint.resume=never)")
        self.start = int(state["position"])


def _ignore_stop_signals(_worker_id: int) -> None:
    """Dataloader workers leave Ctrl-C and preemption signals to the training process (it saves a
    checkpoint at the next step and needs its workers for that); they end with their loader."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


BOOKKEEPING = ("sample", "position", "source")  # ids for logs and checks, not model inputs: kept on the host


class StatefulLoader:
    """The training process's view: next micro-batch, and the reader state at step boundaries.

    ``device`` (CUDA): each micro-batch handed out has its model inputs on the device already, and
    the next one's copy is started in a side stream before this one returns, from pinned host
    memory without blocking, so it overlaps the step's compute. The reader state counts the
    micro-batches handed out, never the one being copied."""

    def __init__(self, stream: PositionalStream, num_workers: int = 0, prefetch_factor: int = 4,
                 pin_memory: bool = False, device: torch.device | None = None):
        self.stream, self.num_workers = stream, num_workers
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self._iter: Iterator | None = None
        self._consumed = 0  # micro-batches handed out since ``stream.start``
        self.device = device
        self._copies = torch.cuda.Stream(device) if device is not None and device.type == "cuda" else None
        self._staged: dict[str, torch.Tensor] | None = None  # the next micro-batch, already on its way

    def _stage(self) -> dict[str, torch.Tensor]:
        """The next micro-batch from the reader, its copy to ``device`` started in the side stream."""
        batch = next(self._iterator())
        if self.device is None:
            return batch
        with torch.cuda.stream(self._copies) if self._copies is not None else contextlib.nullcontext():
            return {k: v if k in BOOKKEEPING else
                    (v if v.is_pinned() or self._copies is None else v.pin_memory()).to(self.device, non_blocking=True)
                    for k, v in batch.items()}

    def _iterator(self) -> Iterator:
        if self._iter is None:
            if self.num_workers == 0:
                self._iter = iter(self.stream)
            else:
                self._iter = iter(DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                             prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory,
                                             persistent_workers=False, worker_init_fn=_ignore_stop_signals))
        return self._iter

    def next(self) -> dict[str, torch.Tensor]:
        if self.device is None:
            batch = next(self._iterator())
        else:
            batch = self._staged if self._staged is not None else self._stage()
            if self._copies is not None:  # the step's kernels wait for its copy; its memory is theirs
                compute = torch.cuda.current_stream(self.device)
                compute.wait_stream(self._copies)
                for k, v in batch.items():
                    if k not in BOOKKEEPING:
                        v.record_stream(compute)
            self._staged = self._stage()
        self._consumed += 1
        return batch

    @property
    def steps_done(self) -> int:
        return self._consumed // self.stream.accum

    @property
    def epoch(self) -> float:
        """Passes over the training set so far (fractional), at a step boundary."""
        return self.stream.epoch_of(self.state_dict()["position"])

    def seek(self, step: int) -> None:
        """Start at optimizer step ``step`` of this run's order (step s read s global batches)."""
        self.close()
        self.stream.start, self._consumed = step * self.stream.global_batch, 0

    def state_dict(self) -> dict[str, Any]:
        if self._consumed % self.stream.accum:
            raise RuntimeError("the reader state is only defined at optimizer-step boundaries")
        return self.stream.state_dict(self.steps_done)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.stream.load_state_dict(state)
        self._consumed = 0

    def close(self) -> None:
        """Stop the dataloader workers now (not when the iterator is garbage collected)."""
        shutdown = getattr(self._iter, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._iter, self._staged = None, None


class TokenWindows:
    """Random access to token windows of one split's concatenated shards, memory-mapped lazily
    (so a reader can be pickled into dataloader workers before anything is opened)."""

    def __init__(self, data: PreparedData, split: str):
        self.paths = data.shard_paths(split)
        self.dtype = data.dtype
        sizes = np.array([s["tokens"] for s in data.manifest["shards"] if s["split"] == split], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.total = int(self.starts[-1])
        self._maps: list[np.memmap] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}

    def window(self, start: int, length: int) -> np.ndarray:
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r") for p in self.paths]
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start - int(self.starts[shard])
        while filled < length:
            m = self._maps[shard]
            take = min(length - filled, len(m) - pos)
            out[filled:filled + take] = m[pos:pos + take]
            filled += take
            shard, pos = shard + 1, 0
        return out


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Per token, the index of its document within the row (documents end at ``eos_id``):
    two tokens may attend to each other only if their ids are equal."""
    ends = (tokens == eos_id).long()
    return torch.cumsum(ends, dim=-1) - ends


def position_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at every document start within a row."""
    idx = torch.arange(doc_ids.shape[-1]).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=-1).values
    return idx - first


class CausalLMStream(PositionalStream):
    """Packed causal-LM sequences from one or more prepared sources (mixed by weight).

    Sample ``i`` of a source is the token window ``[i*L, i*L + L + 1)`` of its train split
    (documents are packed back to back, each ending with EOS); inputs are its first L tokens,
    labels its last L. Batches carry ``source`` and ``sample`` ids, and with
    ``with_documents`` the per-token document ids and restarting position ids.
    """

    def __init__(self, sources: Sequence[PreparedData], seq_len: int, global_batch: int, micro_batch: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, weights: Sequence[float] | None = None,
                 shuffle: bool = True, shuffle_buffer: int = 16384, split: str = "train",
                 with_documents: bool = False):
        super().__init__(global_batch, micro_batch, rank, world_size)
        if not sources:
            raise ValueError("no data sources")
        fingerprints = {d.manifest["tokenizer"]["sha256"] for d in sources}
        if len(fingerprints) > 1:
            others = [str(d.root) for d in sources[1:] if d.manifest["tokenizer"]["sha256"]
                      != sources[0].manifest["tokenizer"]["sha256"]]
            raise DataError(f"{others[0]}/manifest.json: prepared with a different tokenizer than "
                            f"{sources[0].root} (every source of a run must share one tokenizer)")
        self.sources, self.seq_len, self.seed, self.split = list(sources), seq_len, seed, split
        self.eos_id = int(sources[0].manifest["tokenizer"]["eos_id"])
        self.with_documents = with_documents
        self.windows = [TokenWindows(d, split) for d in sources]
        self.orders = []
        for d, w in zip(sources, self.windows):
            n = (w.total - 1) // seq_len
            if n < 1:
                raise DataError(f"{d.root}: the {split} split has {w.total} tokens, fewer than train.seq_len + 1")
            shard_tokens = int(d.manifest.get("settings", {}).get("shard_tokens", 0)) or w.total
            self.orders.append(SampleOrder(n, seed, chunk_size=max(1, shard_tokens // seq_len),
                                           shuffle_buffer=shuffle_buffer, shuffle=shuffle))
        self.weights = list(weights) if weights is not None else [1.0] * len(sources)
        self.mixture = Mixture(self.weights, seed) if len(sources) > 1 else None

    def fingerprint(self) -> dict[str, Any]:
        return {"sources": [d.manifest["stats"]["train_tokens"] for d in self.sources],
                "checksums": [d.manifest["shards"][0]["sha256"] for d in self.sources],
                "weights": self.weights, "seed": self.seed, "seq_len": self.seq_len,
                "shuffle_buffer": self.orders[0].shuffle_buffer, "shuffle": self.orders[0].shuffle}

    @property
    def num_samples(self) -> int:
        return sum(o.num_samples for o in self.orders)

    def locate(self, position: int) -> tuple[int, int]:
        """(source, sample id) at a global position."""
        src, local = self.mixture.locate(position) if self.mixture else (0, int(position))
        return src, self.orders[src].sample_at(local)

    def epoch_of(self, position: int) -> float:
        """Epochs of the (first) source consumed by ``position`` samples."""
        if self.mixture is None:
            return position / self.orders[0].num_samples
        full, rest = divmod(position, self.mixture.block)
        local = full * int(self.mixture.counts[0]) + rest * float(self.mixture.counts[0]) / self.mixture.block
        return local / self.orders[0].num_samples

    def build(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        located = [self.locate(int(p)) for p in positions]
        L = self.seq_len
        rows = np.stack([self.windows[s].window(i * L, L + 1) for s, i in located])
        t = torch.from_numpy(rows)
        batch = {"input_ids": t[:, :-1], "labels": t[:, 1:],
                 "source": torch.tensor([s for s, _ in located]), "sample": torch.tensor([i for _, i in located]),
                 "position": torch.from_numpy(positions)}
        if self.with_documents:
            docs = document_ids(batch["input_ids"], self.eos_id)
            batch["document_ids"], batch["position_ids"] = docs, position_ids(docs)
        return batch


def eval_batches(data: PreparedData, seq_len: int, batch_size: int, max_batches: int | str,
                 rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``max_batches`` x world_size sequential val batches; this rank's share of them.
    ``"all"``: every val window once, the last global batch padded with windows whose targets are
    -100 (ignored), so every rank runs the same number of forwards."""
    windows = TokenWindows(data, "val")
    n = (windows.total - 1) // seq_len
    per_batch = batch_size * world_size
    if max_batches == "all":
        for start in range(0, max(n, 1), per_batch):
            ids = start + rank * batch_size + np.arange(batch_size)
            valid = ids < n
            rows = np.stack([windows.window(int(i if ok else 0) * seq_len, seq_len + 1) for i, ok in zip(ids, valid)])
            t = torch.from_numpy(rows.astype(np.int64))
            x, y = t[:, :-1], t[:, 1:].clone()
            y[torch.from_numpy(~valid)] = -100
            yield x, y
        return
    usable = min(max_batches, n // per_batch) if n >= per_batch else 0
    if usable == 0:  # fewer val sequences than one global batch: every rank sees them all
        ids_list = [np.arange(min(n, batch_size))] if n else []
    else:
        ids_list = [np.arange(b * per_batch + rank * batch_size, b * per_batch + (rank + 1) * batch_size)
                    for b in range(usable)]
    for ids in ids_list:
        rows = np.stack([windows.window(int(i) * seq_len, seq_len + 1) for i in ids])
        t = torch.from_numpy(rows)
        yield t[:, :-1], t[:, 1:]

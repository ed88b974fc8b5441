"""Causal-LM batches straight from a Hugging Face ``datasets.IterableDataset``, for data that already
lives in that format (``load_dataset(..., streaming=True)``), without preparing shards.

Each rank reads its part (``datasets.distributed.split_dataset_by_node``), tokenizes on the fly
and packs documents (each ending with EOS) into ``seq_len + 1``-token windows. The state is the
dataset's own ``state_dict()`` at the last document consumed plus the tokens packed but not yet
yielded, so resuming on the same world size continues exactly. Unlike the prepared-shard reader
(:mod:`bigtrain.data.stream`), the order depends on the world size (the dataset decides which
rank reads which example), so a resume on another world size is refused; there is no global
shuffle beyond what the dataset itself does. Runs in the training process (no dataloader
workers), which is where the dataset's ``state_dict`` is meaningful.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from bigtrain.data.errors import DataError
from bigtrain.data.tokenizer import Tokenizer

STATE_VERSION = 1


class HFTokenStream:
    """This rank's micro-batches ``{"input_ids", "labels"}`` from a streaming HF dataset."""

    def __init__(self, dataset, tokenizer: Tokenizer, seq_len: int, micro_batch: int, accum: int = 1,
                 rank: int = 0, world_size: int = 1, text_field: str = "text"):
        from datasets.distributed import split_dataset_by_node

        self.dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size) if world_size > 1 else dataset
        self.tokenizer, self.seq_len, self.micro_batch, self.accum = tokenizer, seq_len, micro_batch, accum
        self.rank, self.world_size, self.text_field = rank, world_size, text_field
        self._pending: list[int] = []  # tokens packed but not yet yielded
        self._iter: Iterator[dict[str, torch.Tensor]] | None = None
        self._consumed = 0
        self._state_at_step: dict[str, Any] | None = None

    def _documents(self) -> Iterator[tuple[list[int], dict]]:
        for row, record in enumerate(self.dataset, 1):
            text = record.get(self.text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"HF dataset record {row} on rank {self.rank}: no string field '{self.text_field}'")
            if text:
                yield self.tokenizer.encode(text) + [self.tokenizer.eos_id], self.dataset.state_dict()

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        need = self.micro_batch * (self.seq_len + 1)
        hf_state = self.dataset.state_dict()
        docs = self._documents()
        while True:
            while len(self._pending) < need:
                try:
                    tokens, hf_state = next(docs)
                except StopIteration:
                    return  # the stream is exhausted; the last partial batch is dropped
                self._pending.extend(tokens)
            rows = torch.tensor(self._pending[:need]).view(self.micro_batch, self.seq_len + 1)
            self._pending = self._pending[need:]
            self._hf_state = hf_state
            yield {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}

    def next(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._iter = self._batches()
        try:
            batch = next(self._iter)
        except StopIteration:
            raise StopIteration(f"the HF dataset on rank {self.rank} ran out of documents") from None
        self._consumed += 1
        if self._consumed % self.accum == 0:
            self._state_at_step = {"version": STATE_VERSION, "hf": self._hf_state, "pending": list(self._pending),
                                   "world_size": self.world_size, "rank": self.rank}
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self._consumed % self.accum:
            raise RuntimeError("the reader state is only defined at optimizer-step boundaries")
        if self._state_at_step is None:
            return {"version": STATE_VERSION, "hf": self.dataset.state_dict(), "pending": list(self._pending),
                    "world_size": self.world_size, "rank": self.rank}
        return self._state_at_step

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"HF stream state: unsupported version {state.get('version')!r}")
        if state["world_size"] != self.world_size:
            raise DataError(f"HF stream state was saved by {state['world_size']} ranks, this run has "
                            f"{self.world_size}: a streaming HF dataset cannot be resharded exactly "
                            "(prepare it into shards with `bigtrain data prepare` for that)")
        self.dataset.load_state_dict(state["hf"])
        self._pending = list(state["pending"])
        self._iter, self._consumed, self._state_at_step = None, 0, None

    def close(self) -> None:
        self._iter = None

"""torch DistributedDataParallel: every rank holds the full model and optimizer state.

Checkpoints are the single-process files (rank 0 writes them), so ``single`` and ``ddp``
checkpoints are interchangeable and a DDP run can resume on any number of ranks.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bigtrain.checkpoint import done_future
from bigtrain.strategies.base import to_device
from bigtrain.strategies.single import SingleStrategy


class DDPStrategy(SingleStrategy):
    name = "ddp"

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        self.ddp = DistributedDataParallel(
            self.raw_model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
        self.model = torch.compile(self.ddp) if self.cfg.train.compile else self.ddp

    def forward_backward(self, batch, scale, last_micro):
        # Gradients are all-reduced (averaged over ranks) only on the last micro-batch.
        sync = contextlib.nullcontext() if last_micro else self.ddp.no_sync()
        with sync:
            with self.precision_context():
                loss = self.objective(self.model, to_device(batch, self.device))
            self.scaler.scale(loss * scale).backward()
        return loss.detach()

    def save(self, directory: Path) -> None:
        if self.info.is_main:  # replicas are identical: one copy
            super().save(directory)

    def async_save(self, directory: Path) -> Future:
        return super().async_save(directory) if self.info.is_main else done_future()

    def memory_report(self):
        report = super().memory_report()
        # DDP keeps gradients in flat communication buckets (gradient_as_bucket_view: the
        # gradients are views into them, so they are not counted twice); sizes from its reducer.
        sizes = self.ddp._get_ddp_logging_data().get("bucket_sizes", "")
        report["ddp_bucket_bytes"] = sum(int(b) for b in str(sizes).split(",") if b.strip())
        return report

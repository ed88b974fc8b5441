"""The per-step record the loop logs (``metrics.jsonl``): loss, learning rate, gradient norm,
throughput, MFU, memory. The loop hands it each micro-batch's loss (a device tensor, no host
sync) and asks for a record at log intervals, the only place it syncs with the device."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as tdist


def mean_over_ranks(value: torch.Tensor) -> float:
    """Host-syncing mean across ranks (only called at log intervals)."""
    value = value.detach().float().clone()
    if tdist.is_initialized():
        tdist.all_reduce(value)
        value /= tdist.get_world_size()
    return value.item()


class StepMetrics:
    """Throughput counts training time only: evaluations and checkpoints run inside :meth:`paused`."""

    def __init__(self, *, device: torch.device, start_step: int, samples_per_step: int, tokens_per_sample: int,
                 flops_per_sample: float, peak_flops: float, world_size: int,
                 clock: Callable[[], float] = time.perf_counter):
        self.samples_per_step, self.tokens_per_sample = samples_per_step, tokens_per_sample
        self.flops_per_sample, self.peak_flops, self.world_size = flops_per_sample, peak_flops, world_size
        self.clock = clock
        self.loss_sum = torch.zeros((), device=device)
        self.micro_batches = 0
        self.last_step = start_step
        self.t_start = self.t_last = clock()
        self.paused_s = 0.0  # not training, since the last record

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.micro_batches += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent in here is not training (evaluation, a checkpoint)."""
        began = self.clock()
        try:
            yield
        finally:
            self.paused_s += self.clock() - began

    def record(self, step: int, *, lr: float, grad_norm: torch.Tensor, epoch: float,
               memory: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The record for the steps since the last one (collective: the loss is averaged over ranks)."""
        loss = mean_over_ranks(self.loss_sum) / self.micro_batches
        now = self.clock()
        sps = self.samples_per_step * (step - self.last_step) / max(now - self.t_last - self.paused_s, 1e-9)
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm)}
        if self.tokens_per_sample:
            record.update(tokens_per_s=sps * self.tokens_per_sample,
                          tokens_seen=step * self.samples_per_step * self.tokens_per_sample)
        record.update({
            "samples_per_s": sps, "samples_seen": step * self.samples_per_step, "elapsed_s": now - self.t_start,
            "epoch": epoch, "mfu": self.flops_per_sample * sps / (self.peak_flops * self.world_size),
            **{f"mem_{k}": v for k, v in memory().items()},
        })
        self.loss_sum.zero_()
        self.micro_batches = 0
        self.last_step = step
        self.t_last, self.paused_s = self.clock(), 0.0
        return record

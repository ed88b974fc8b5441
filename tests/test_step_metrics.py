"""The per-step record's throughput counts training time only (bigtrain.tracking.step_metrics)."""

from __future__ import annotations

import pytest
import torch

from bigtrain.tracking.step_metrics import StepMetrics


def test_evaluation_and_checkpoint_time_is_not_training_time():
    now = [100.0]
    metrics = StepMetrics(device=torch.device("cpu"), start_step=0, samples_per_step=16, tokens_per_sample=256,
                          flops_per_sample=1e9, peak_flops=1e12, world_size=2, clock=lambda: now[0])
    for step in range(1, 11):  # 10 steps of 0.5 s, an 8 s checkpoint after step 4 and a 2 s evaluation after 8
        metrics.add_loss(torch.tensor(2.0))
        now[0] += 0.5
        if step in (4, 8):
            with metrics.paused():
                now[0] += 8.0 if step == 4 else 2.0
    record = metrics.record(10, lr=1e-3, grad_norm=torch.tensor(0.5), epoch=0.1, memory=lambda: {"peak": 7})
    assert record["samples_per_s"] == pytest.approx(16 * 10 / 5.0)  # 160 samples in 5 s of training
    assert record["tokens_per_s"] == pytest.approx(16 * 256 * 10 / 5.0)
    assert record["tokens_seen"] == 10 * 16 * 256 and record["samples_seen"] == 160
    assert record["mfu"] == pytest.approx(1e9 * 32 / (1e12 * 2))
    assert record["elapsed_s"] == pytest.approx(15.0) and record["loss"] == 2.0 and record["mem_peak"] == 7
    now[0] += 1.0  # the next window starts at the record, with nothing paused
    metrics.add_loss(torch.tensor(1.0))
    assert metrics.record(11, lr=1e-3, grad_norm=torch.tensor(0.5), epoch=0.1, memory=dict)["samples_per_s"] == 16.0

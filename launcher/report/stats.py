"""The numbers a report shows: config differences, per-run summaries, sweep leaderboards."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from launcher.report.runs import Run, Sweep, Trial
from launcher.report.values import finite


def _values(records: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in records if finite(r.get(key))]


def rate_key(runs: Sequence[Run]) -> str:
    """tokens_per_s when every run has it (text tasks), else samples_per_s."""
    return "tokens_per_s" if all(_values(r.metrics, "tokens_per_s") for r in runs) else "samples_per_s"


def seen_key(runs: Sequence[Run]) -> str:
    return "tokens_seen" if all(_values(r.metrics, "tokens_seen") for r in runs) else "samples_seen"


def summary(run: Run, rate: str = "tokens_per_s") -> dict[str, Any]:
    """Final and best metrics, median throughput and MFU, peak memory of one run."""
    last = run.metrics[-1]
    out: dict[str, Any] = {"step": last["step"], "loss": last.get("loss"), "tokens_seen": last.get("tokens_seen"),
                           "samples_seen": last.get("samples_seen")}
    for key, best in (("val_loss", min), ("val_ppl", min), ("val_accuracy", max)):
        evals = [e for e in run.evals if finite(e.get(key))]
        if evals:
            top = best(evals, key=lambda e: e[key])
            out[key], out[f"best_{key}"], out[f"best_{key}_step"] = evals[-1][key], top[key], top["step"]
    for key in (rate, "mfu"):
        values = _values(run.metrics, key)
        out[f"median_{key}"] = statistics.median(values) if values else None
    peaks = [v for r in run.metrics for k, v in r.items() if k.startswith("mem_peak") and finite(v)]
    out["peak_memory_bytes"] = max(peaks) if peaks else None
    return out


def final_metric(runs: Sequence[Run]) -> str:
    """What a sweep ranks by: final val_loss when any trial has one, else final train loss."""
    return "val_loss" if any(_values(r.evals, "val_loss") for r in runs) else "loss"


def leaderboard(sweep: Sweep) -> tuple[str, str, list[tuple[Trial, dict[str, Any] | None]]]:
    """The metric ranked by, the throughput key, and the trials with their summaries, best first
    by final val_loss (trials without it last)."""
    runs = [t.run for t in sweep.trials if t.run]
    metric, rate = final_metric(runs), rate_key(runs)
    rows = [(t, summary(t.run, rate) if t.run else None) for t in sweep.trials]
    rows.sort(key=lambda row: (row[1] is None or not finite(row[1].get(metric)),
                               row[1][metric] if row[1] and finite(row[1].get(metric)) else 0, row[0].index))
    return metric, rate, rows

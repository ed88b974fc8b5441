"""``bigtrain sweep``: trials on this machine, one after another; Bayesian search with an Optuna
study in the sweep directory, trials reporting at every evaluation and pruned early."""

from __future__ import annotations

import json
import math

import pytest

from conftest import TEST_CONFIG, run_cli

pytestmark = pytest.mark.slow

COMMON = ["train.max_steps=12", "train.eval_every=3", "train.sample_tokens=0", "checkpoint.save_final=false",
          "schedule.warmup_steps=2"]
LOW, HIGH = 1e-4, 3e-1


def sweep(run_dir, cache_dir, tiny_text, *args):
    return run_cli("sweep", str(TEST_CONFIG), f"data.path={tiny_text}", f"data.cache_dir={cache_dir}",
                   f"run.dir={run_dir}", *COMMON, *args, timeout=1800)


def trials(run_dir) -> list[dict]:
    return json.loads((run_dir / "sweep.json").read_text())["tasks"]


def test_bayes_finds_a_learning_rate_as_good_as_a_grid_and_prunes(tmp_path, cache_dir, tiny_text):
    grid = [LOW * (HIGH / LOW) ** (i / 11) for i in range(12)]
    ran = sweep(tmp_path / "grid", cache_dir, tiny_text, "--sweep-mode", "grid",
                "--sweep", "optim.lr=[" + ",".join(f"{v:.6g}" for v in grid) + "]")
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    best_grid = min(t["val_loss"] for t in trials(tmp_path / "grid") if t["state"] == "complete")

    bayes = sweep(tmp_path / "bayes", cache_dir, tiny_text, "--sweep", f"optim.lr=loguniform({LOW},{HIGH})",
                  "--trials", "12")
    assert bayes.returncode == 0, bayes.stdout[-3000:] + bayes.stderr[-3000:]
    done = trials(tmp_path / "bayes")
    assert len(done) == 12 and (tmp_path / "bayes" / "study.journal").is_file()
    best = min(t["val_loss"] for t in done if t["state"] == "complete")
    assert best <= best_grid + 0.05, (best, best_grid)
    pruned = [t for t in done if t["state"] == "pruned"]
    assert len(pruned) >= 4, [t["state"] for t in done]
    for t in pruned:  # stopped at an evaluation before the end, with the exit code that is not requeued
        metrics = (tmp_path / "bayes" / f"sweep-{t['index']}" / "metrics.jsonl").read_text().splitlines()
        assert json.loads(metrics[-1])["step"] < 12
    assert all(LOW <= t["setting"]["optim.lr"] <= HIGH for t in done)
    table = run_cli("sweep-report", str(tmp_path / "bayes"))
    assert table.returncode == 0
    rows = [line for line in table.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 12 and sum("pruned" in r for r in rows) == len(pruned)  # every trial once, with its state


def test_bad_spaces_and_a_study_of_another_sweep_are_one_line(tmp_path, cache_dir, tiny_text):
    bad = sweep(tmp_path / "a", cache_dir, tiny_text, "--sweep", "optim.lr=loguniform(1e-4)", "--trials", "2")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --sweep 'optim.lr=loguniform(1e-4)'")
    first = sweep(tmp_path / "b", cache_dir, tiny_text, "--sweep", "optim.lr=[1e-3]", "--trials", "1",
                  "train.max_steps=3")
    assert first.returncode == 0, first.stderr[-2000:]
    journal = (tmp_path / "b" / "study.journal").read_bytes()
    other = sweep(tmp_path / "b", cache_dir, tiny_text, "--sweep", "optim.lr=[1e-2]", "--trials", "1")
    assert other.returncode == 2
    assert "study.journal: study 'gpt-test' belongs to another sweep (its overrides, space differ)" in other.stderr
    assert (tmp_path / "b" / "study.journal").read_bytes() == journal  # untouched
    assert math.isfinite(trials(tmp_path / "b")[0]["val_loss"])

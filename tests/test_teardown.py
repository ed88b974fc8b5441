"""A run always tears down: Ctrl-C saves at the next step and exits 130 (a second one exits at
once), an error inside the loop leaves no processes and no half-written checkpoint behind and
says what failed. Real processes, real signals, at 1 and 2 ranks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from conftest import read_jsonl, run_cli, train_args
from test_checkpoint import losses, ok, start, wait_for_step

STEPS = 10


def args(run_dir, cache_dir, tiny_text, nproc, *extra):
    ranks = ["strategy.name=ddp", "--nproc", "2"] if nproc == 2 else []
    return train_args(run_dir, cache_dir, tiny_text, f"train.max_steps={STEPS}", "train.sample_tokens=0",
                      "checkpoint.every_steps=100", *ranks, *extra)


def survivors(run_dir) -> list[str]:
    """Processes still running whose command line names the run (ranks, dataloader workers)."""
    out = subprocess.run(["pgrep", "-af", str(run_dir)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.dist)])
def test_ctrl_c_saves_at_the_next_step_exits_130_and_resumes_exactly(tmp_path, cache_dir, tiny_text, nproc):
    reference = tmp_path / "reference"
    ok(run_cli(*args(reference, cache_dir, tiny_text, nproc)))
    run_dir = tmp_path / "run"
    argv = args(run_dir, cache_dir, tiny_text, nproc, "data.num_workers=1")
    proc = start(argv, env={"BIGTRAIN_TEST_STEP_DELAY_S": "0.3"})
    wait_for_step(run_dir, 3, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground process group
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("interrupted (")]
    assert len(lines) == 1, out[-3000:]
    match = re.match(r"interrupted \((SIGINT|peer rank)\) after step (\d+): checkpoint (\S+); exiting with code 130",
                     lines[0])
    assert match, lines[0]
    step, checkpoint = int(match.group(2)), match.group(3)
    assert 3 <= step < STEPS and checkpoint == str(run_dir / "checkpoints" / f"step-{step}")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step-{step}"]
    assert not survivors(run_dir)
    again = ok(run_cli(*argv))
    assert f"resumed from {checkpoint} at step {step}" in again.stdout
    assert losses(run_dir) == losses(reference)


def test_a_second_ctrl_c_exits_at_once_without_a_checkpoint(tmp_path, cache_dir, tiny_text):
    run_dir = tmp_path / "run"
    proc = start(args(run_dir, cache_dir, tiny_text, 1), env={"BIGTRAIN_TEST_STEP_DELAY_S": "2"})
    wait_for_step(run_dir, 1, proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.time()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.time() - t0 < 2.5, out[-2000:]
    assert "interrupted again: exiting now, without a checkpoint" in out
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.dist)])
def test_an_error_in_the_loop_leaves_no_processes_or_partial_checkpoints(tmp_path, cache_dir, tiny_text, nproc):
    """Failing at step 5 while step 4's checkpoint is written in the background, with dataloader
    workers running: exit 1, the last line names the step and the error, nothing is left."""
    run_dir = tmp_path / "run"
    proc = run_cli(*args(run_dir, cache_dir, tiny_text, nproc, "checkpoint.every_steps=2", "checkpoint.async=true",
                         "data.num_workers=2"), env={"BIGTRAIN_FAULT": "loop-error@5"})
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    message = "error: training failed in step 5: RuntimeError: injected failure at step 5 (BIGTRAIN_FAULT)"
    lines = proc.stderr.strip().splitlines()
    if nproc == 1:
        assert lines[-1] == message  # after the traceback, the last line says what failed
    else:  # every rank says so (torchrun's own report follows)
        assert lines.count(message) == 2, proc.stderr[-3000:]
    assert not list((run_dir / "checkpoints").glob("*.tmp"))
    assert "step-2" in [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]
    time.sleep(0.5)
    assert not survivors(run_dir)

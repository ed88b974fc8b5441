"""Sharded and replicated checkpoints across world sizes and restarts, on real ranks (torchrun,
gloo): resharding 2 -> 1 and 1 -> 2 ranks, and torchrun restarting a killed rank.

Killing a run mid-checkpoint, exact resume and export for every engine are in test_matrix.py;
these tests reuse its reference runs (conftest.engine_reference)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from bigtrain.dist import free_port
from conftest import MATRIX_STEPS as STEPS
from conftest import OFFLINE_ENV, ROOT, matrix_args, run_cli
from test_checkpoint import losses, ok, wait_for_step

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def keep_only(run_dir, step: int) -> None:
    for ckpt in (run_dir / "checkpoints").iterdir():
        if ckpt.name != f"step-{step}":
            shutil.rmtree(ckpt)


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero2", "zero3"])
def test_reshard_two_ranks_to_one(tmp_path, engine_reference, cache_dir, tiny_text, engine):
    """Resume a 2-rank checkpoint on 1 rank: the losses follow the 2-rank continuation.

    DeepSpeed goes through ds_to_universal: ZeRO-2 needs the converter's --inject_missing_state,
    ZeRO-3 a step counter per sub-group after the universal load (DeepSpeed shares one)."""
    reference, _ = engine_reference(engine)
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    keep_only(run_dir, 8)
    one = ok(run_cli(*matrix_args(run_dir, cache_dir, tiny_text, engine, "checkpoint.keep_last=1", nproc=1)))
    assert "resumed from" in one.stdout and "step-8" in one.stdout
    converted = "converting step-8 to a universal checkpoint" in one.stdout
    assert converted == engine.startswith("zero"), one.stdout
    # the conversion is pruned with its checkpoint
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step-{STEPS}"]
    ref, got = losses(reference), losses(run_dir)
    assert got[9] == ref[9]  # the restored weights are exact
    for step in range(9, STEPS + 1):
        assert got[step] == pytest.approx(ref[step], abs=1e-5), (step, got[step], ref[step])


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero3"])
def test_reshard_one_rank_to_two(tmp_path, engine_reference, cache_dir, tiny_text, engine):
    """A run started on 1 rank continues on 2: the losses follow the 1-rank continuation."""
    reference, _ = engine_reference(engine, nproc=1)
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    keep_only(run_dir, 8)
    two = ok(run_cli(*matrix_args(run_dir, cache_dir, tiny_text, engine)))
    assert "resumed from" in two.stdout and "step-8" in two.stdout and "x 2" in two.stdout
    ref, got = losses(reference), losses(run_dir)
    assert got[9] == pytest.approx(ref[9], abs=1e-6)  # the same weights, gradients reduced in another order
    for step in range(9, STEPS + 1):
        assert got[step] == pytest.approx(ref[step], abs=1e-5), (step, got[step], ref[step])


def test_torchrun_restarts_a_killed_rank_and_the_run_resumes(tmp_path, engine_reference, cache_dir, tiny_text):
    reference, _ = engine_reference("fsdp")
    run_dir = tmp_path / "run"
    argv = matrix_args(run_dir, cache_dir, tiny_text, "fsdp")[1:]  # drop "train"
    argv = [a for a in argv if a not in ("--nproc", "2")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--max-restarts=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "bigtrain.train", *argv]
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1", "BIGTRAIN_TEST_STEP_DELAY_S": "0.3"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_for_step(run_dir, 6, proc)
    ranks = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "bigtrain.train"], capture_output=True, text=True)
    pids = [int(p) for p in ranks.stdout.split()]
    assert len(pids) == 2, ranks.stdout
    os.kill(pids[-1], signal.SIGKILL)  # one rank dies; the agent restarts both
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out
    assert losses(run_dir) == losses(reference)  # every step, bit-identical

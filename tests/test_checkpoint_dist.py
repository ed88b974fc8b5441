"""Fault tolerance of sharded engines on 2 real ranks (torchrun, gloo): exact resume after
SIGKILL, torchrun restarts, resharding 2 -> 1, export of sharded checkpoints."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bigtrain.dist import free_port
from conftest import OFFLINE_ENV, ROOT, run_cli, train_args
from test_checkpoint import losses, ok, start, wait_for_step

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = 12
ENGINES = {
    "fsdp": ["strategy.name=fsdp"],
    "deepspeed": ["strategy.name=deepspeed", "strategy.deepspeed.stage=3"],
    "deepspeed-zero2": ["strategy.name=deepspeed", "strategy.deepspeed.stage=2"],  # resharding only
}


def dist_args(run_dir, cache_dir, tiny_text, engine, *extra, nproc=2):
    return train_args(run_dir, cache_dir, tiny_text, f"train.max_steps={STEPS}", "train.sample_tokens=0",
                      "checkpoint.keep_last=10", "checkpoint.every_steps=4", *ENGINES[engine],
                      "--nproc", str(nproc), *extra)


@pytest.fixture(scope="module")
def references(tmp_path_factory, cache_dir, tiny_text):
    """Uninterrupted 2-rank runs, one per engine."""
    out = {}
    for engine in ENGINES:
        run_dir = tmp_path_factory.mktemp(f"ref-{engine}") / "run"
        ok(run_cli(*dist_args(run_dir, cache_dir, tiny_text, engine)))
        out[engine] = run_dir
    return out


def model_state(run_dir: Path, step: int) -> dict:
    """Consolidated weights of a checkpoint of any engine (what export uses)."""
    import yaml
    from bigtrain.config import validate
    from bigtrain.data.tokenizer import Tokenizer
    from bigtrain.export import load_model_weights
    from bigtrain.models import build_causal_lm
    import json

    ckpt = run_dir / "checkpoints" / f"step-{step}"
    cfg = validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
    vocab = Tokenizer.load(ckpt / "tokenizer.model").vocab_size
    model = build_causal_lm(cfg.model, vocab, cfg.train.seq_len)
    load_model_weights(json.loads((ckpt / "manifest.json").read_text())["strategy"], ckpt, model)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_sigkill_and_restart_resumes_bit_identically(tmp_path, references, cache_dir, tiny_text, engine):
    run_dir = tmp_path / "run"
    argv = dist_args(run_dir, cache_dir, tiny_text, engine)
    proc = start(argv, env={"BIGTRAIN_TEST_STEP_DELAY_S": "0.3"})
    killed_at = wait_for_step(run_dir, 6, proc)
    kill_tree(proc.pid)  # every rank and the torchrun agent (ranks run in their own sessions)
    proc.wait()
    assert killed_at < STEPS
    again = ok(run_cli(*argv))
    resumed = re.search(r"resumed from \S+/step-(\d+)", again.stdout)
    assert resumed and 4 <= int(resumed.group(1)) <= killed_at, again.stdout[-2000:]
    assert losses(run_dir) == losses(references[engine])
    a, b = model_state(run_dir, STEPS), model_state(references[engine], STEPS)
    assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_reshard_two_ranks_to_one(tmp_path, references, cache_dir, tiny_text, engine):
    """Resume a 2-rank checkpoint on 1 rank: the losses follow the 2-rank continuation.

    DeepSpeed goes through ds_to_universal: ZeRO-2 needs the converter's --inject_missing_state,
    ZeRO-3 a step counter per sub-group after the universal load (DeepSpeed shares one)."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(references[engine], run_dir)
    for ckpt in (run_dir / "checkpoints").iterdir():
        if ckpt.name != "step-8":
            shutil.rmtree(ckpt)
    one = run_cli(*dist_args(run_dir, cache_dir, tiny_text, engine, "checkpoint.keep_last=1", nproc=1))
    ok(one)
    assert "resumed from" in one.stdout and "step-8" in one.stdout
    converted = "converting step-8 to a universal checkpoint" in one.stdout
    assert converted == engine.startswith("deepspeed"), one.stdout
    # the conversion is pruned with its checkpoint
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step-{STEPS}"]
    ref, got = losses(references[engine]), losses(run_dir)
    assert got[9] == ref[9]  # the restored weights are exact
    for step in range(9, STEPS + 1):
        assert got[step] == pytest.approx(ref[step], abs=1e-5), (step, got[step], ref[step])


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(p) for p in out]
    return kids + [d for k in kids for d in descendants(k)]


def kill_tree(pid: int) -> None:
    for victim in [pid, *descendants(pid)]:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_torchrun_restarts_a_killed_rank_and_the_run_resumes(tmp_path, references, cache_dir, tiny_text):
    run_dir = tmp_path / "run"
    argv = dist_args(run_dir, cache_dir, tiny_text, "fsdp")[1:]  # drop "train"
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
    assert losses(run_dir)[STEPS] == losses(references["fsdp"])[STEPS]


@pytest.mark.parametrize("engine", ["fsdp", "deepspeed"])
def test_export_sharded_checkpoint_to_hugging_face(tmp_path, references, engine):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "bigtrain.export", str(references[engine]), "--to", "hf", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, **OFFLINE_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    state = model_state(references[engine], STEPS)
    for key, value in hf.state_dict().items():
        assert torch.equal(value, state[key]), key

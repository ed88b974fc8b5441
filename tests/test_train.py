"""Single-process training on real text, as a user runs it (the CLI, in a subprocess)."""

import json

import pytest
import torch

from bigtrain.perf import measured_matmul_flops
from conftest import read_jsonl, run_cli, train_args


def train_run(tmp_path, name, cache_dir, tiny_text, *extra):
    run_dir = tmp_path / name
    proc = run_cli(*train_args(run_dir, cache_dir, tiny_text, *extra))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return run_dir, proc


def test_training_reduces_loss_and_writes_the_run_dir(tmp_path, cache_dir, tiny_text):
    run_dir, proc = train_run(tmp_path, "run", cache_dir, tiny_text, "train.max_steps=30", "train.eval_every=15")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 31))
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "mfu", "mem_param_bytes"):
        assert key in metrics[0]
    first = sum(m["loss"] for m in metrics[:3]) / 3
    last = sum(m["loss"] for m in metrics[-3:]) / 3
    assert last < first - 1.0, (first, last)
    evals = read_jsonl(run_dir / "eval.jsonl")
    assert [e["step"] for e in evals] == [15, 30]
    assert evals[1]["val_loss"] < evals[0]["val_loss"]
    assert evals[1]["val_ppl"] == pytest.approx(2.718281828 ** evals[1]["val_loss"], rel=1e-6)
    ckpt = run_dir / "checkpoints" / "step-30"
    assert (ckpt / "manifest.json").is_file() and (ckpt / "model.safetensors").is_file()
    assert (run_dir / "config.yaml").read_text().startswith("run:")
    assert "sample:" in proc.stdout
    assert f"checkpoint:  {ckpt}" in proc.stdout
    assert "unigram entropy" in proc.stdout


def test_same_config_gives_same_losses(tmp_path, cache_dir, tiny_text):
    a, _ = train_run(tmp_path, "a", cache_dir, tiny_text, "train.max_steps=8", "checkpoint.save_final=false")
    b, _ = train_run(tmp_path, "b", cache_dir, tiny_text, "train.max_steps=8", "checkpoint.save_final=false")
    la = [m["loss"] for m in read_jsonl(a / "metrics.jsonl")]
    lb = [m["loss"] for m in read_jsonl(b / "metrics.jsonl")]
    assert la == lb
    c, _ = train_run(tmp_path, "c", cache_dir, tiny_text, "train.max_steps=8", "seed=7", "checkpoint.save_final=false")
    assert [m["loss"] for m in read_jsonl(c / "metrics.jsonl")] != la


def test_grad_accumulation_matches_one_big_batch(tmp_path, cache_dir, tiny_text):
    big, _ = train_run(tmp_path, "big", cache_dir, tiny_text, "train.max_steps=5", "train.micro_batch_size=8",
                       "checkpoint.save_final=false")
    acc, _ = train_run(tmp_path, "acc", cache_dir, tiny_text, "train.max_steps=5", "train.micro_batch_size=2",
                       "checkpoint.save_final=false")
    lb = [m["loss"] for m in read_jsonl(big / "metrics.jsonl")]
    la = [m["loss"] for m in read_jsonl(acc / "metrics.jsonl")]
    assert la == pytest.approx(lb, abs=1e-4)


def test_resume_continues_exactly(tmp_path, cache_dir, tiny_text):
    full, _ = train_run(tmp_path, "full", cache_dir, tiny_text, "train.max_steps=12")
    part_dir = tmp_path / "part"
    train_run(tmp_path, "part", cache_dir, tiny_text, "train.max_steps=12", "checkpoint.every_steps=6",
              "checkpoint.keep_last=5")
    # Drop the final checkpoint: the next start resumes from step 6 and redoes 7..12.
    import shutil

    shutil.rmtree(part_dir / "checkpoints" / "step-12")
    _, proc = train_run(tmp_path, "part", cache_dir, tiny_text, "train.max_steps=12", "checkpoint.every_steps=6")
    assert "resumed from" in proc.stdout and "step-6" in proc.stdout
    lf = [m["loss"] for m in read_jsonl(full / "metrics.jsonl")]
    lp = [m["loss"] for m in read_jsonl(part_dir / "metrics.jsonl")]
    assert [m["step"] for m in read_jsonl(part_dir / "metrics.jsonl")] == list(range(1, 13))
    assert lp == lf
    ef = json.loads((full / "checkpoints" / "step-12" / "trainer_state.json").read_text())
    ep = json.loads((part_dir / "checkpoints" / "step-12" / "trainer_state.json").read_text())
    assert ef["val_loss"] == ep["val_loss"]


def test_bf16_and_activation_checkpointing_train(tmp_path, cache_dir, tiny_text):
    base, _ = train_run(tmp_path, "base", cache_dir, tiny_text, "train.max_steps=4", "checkpoint.save_final=false")
    ac, _ = train_run(tmp_path, "ac", cache_dir, tiny_text, "train.max_steps=4", "checkpoint.save_final=false",
                      "strategy.activation_checkpointing=true")
    lb = [m["loss"] for m in read_jsonl(base / "metrics.jsonl")]
    assert [m["loss"] for m in read_jsonl(ac / "metrics.jsonl")] == pytest.approx(lb, abs=1e-5)
    bf, proc = train_run(tmp_path, "bf", cache_dir, tiny_text, "train.max_steps=4", "checkpoint.save_final=false",
                         "precision=bf16")
    assert [m["loss"] for m in read_jsonl(bf / "metrics.jsonl")] == pytest.approx(lb, abs=5e-2)
    # a CPU without bf16 instructions runs bf16 matmuls ~100x slower than fp32: the run says so
    # (the measurement itself stays cheap); with native bf16 (AVX512-BF16, AMX) it does not
    slow = measured_matmul_flops("cpu", torch.float32) > 2 * measured_matmul_flops("cpu", torch.bfloat16)
    assert ("warning: precision bf16: a matmul runs" in proc.stdout) == slow, proc.stdout[-2000:]


def test_wandb_offline_logs_metrics_and_a_resumed_run_continues_the_same_wandb_run(tmp_path, cache_dir, tiny_text):
    """W&B for real, offline (no network): the run's records hold our train/ and eval/ metrics,
    and a resume in the same run dir continues the same W&B run id."""
    run_dir = tmp_path / "run"
    args = ["train.sample_tokens=0", "tracking.wandb.mode=offline", "tracking.wandb.project=bt-test"]
    for steps in (2, 4):
        proc = run_cli(*train_args(run_dir, cache_dir, tiny_text, f"train.max_steps={steps}", *args),
                       env={"WANDB_MODE": "offline"})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run_id = (run_dir / "wandb_id.txt").read_text()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert [r.name.rsplit("-", 1)[1] for r in runs] == [run_id, run_id]
    for run in runs:
        records = (run / f"run-{run_id}.wandb").read_bytes()
        assert b"train/loss" in records and b"train/tokens_per_s" in records and b"eval/val_loss" in records
        assert b"bt-test" in records
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]

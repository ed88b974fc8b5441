"""Fault tolerance with real processes and real kills: exact resume, partial writes, corruption,
failed saves, preemption, retention, HF export."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import OFFLINE_ENV, ROOT, read_jsonl, run_cli, train_args

STEPS = 16


def args(run_dir, cache_dir, tiny_text, *extra):
    return train_args(run_dir, cache_dir, tiny_text, f"train.max_steps={STEPS}", "train.sample_tokens=0",
                      "checkpoint.keep_last=10", *extra)


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl")}


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir, tiny_text):
    """An uninterrupted run that every interrupted one must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    ok(run_cli(*args(run_dir, cache_dir, tiny_text)))
    return run_dir


def start(argv, env=None):
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", *argv], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **OFFLINE_ENV, **(env or {})})


def wait_for_step(run_dir: Path, step: int, proc, timeout=300) -> int:
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.is_file():
            seen = [m["step"] for m in read_jsonl(metrics)] if metrics.stat().st_size else []
            if seen and seen[-1] >= step:
                return seen[-1]
        assert proc.poll() is None, f"run ended early: {proc.stdout.read()[-2000:]}"
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def test_sigkill_between_checkpoints_resumes_bit_identically(tmp_path, reference, cache_dir, tiny_text):
    run_dir = tmp_path / "run"
    argv = args(run_dir, cache_dir, tiny_text, "checkpoint.every_steps=5")
    proc = start(argv, env={"BIGTRAIN_TEST_STEP_DELAY_S": "0.2"})
    killed_at = wait_for_step(run_dir, 7, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed_at < STEPS
    assert not (run_dir / "checkpoints" / f"step-{STEPS}").exists()
    second = ok(run_cli(*argv))
    assert "resumed from" in second.stdout
    assert losses(run_dir) == losses(reference)  # bit-identical, every step
    assert same_weights(run_dir / "checkpoints" / f"step-{STEPS}", reference / "checkpoints" / f"step-{STEPS}")


@pytest.mark.parametrize("fault, asynchronous", [
    ("checkpoint-engine-write", False),
    ("checkpoint-before-manifest", False),
    ("checkpoint-before-rename", False),
    ("checkpoint-engine-write", True),
    ("checkpoint-before-rename", True),
])
def test_kill_during_checkpoint_write_keeps_previous(tmp_path, reference, cache_dir, tiny_text, fault, asynchronous):
    run_dir = tmp_path / "run"
    argv = args(run_dir, cache_dir, tiny_text, "checkpoint.every_steps=5",
                f"checkpoint.async={str(asynchronous).lower()}")
    crashed = run_cli(*argv, env={"BIGTRAIN_FAULT": f"{fault}@10"})  # commits step-5, dies writing step-10
    assert crashed.returncode == -signal.SIGKILL
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "step-10" not in ckpts and "step-5" in ckpts
    assert "step-10.tmp" in ckpts  # the partial write is there ...
    resumed = ok(run_cli(*argv))
    assert "resumed from" in resumed.stdout and "step-5" in resumed.stdout  # ... and ignored
    assert not (run_dir / "checkpoints" / "step-10.tmp").exists()
    assert losses(run_dir) == losses(reference)


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "manifest"])
def test_corrupt_checkpoint_is_skipped_with_a_warning(tmp_path, reference, cache_dir, tiny_text, damage):
    run_dir = tmp_path / "run"
    argv = args(run_dir, cache_dir, tiny_text, "checkpoint.every_steps=5")
    ok(run_cli(*argv))  # checkpoints 5, 10, 15, 16
    victim = run_dir / "checkpoints" / f"step-{STEPS}" / "model.safetensors"
    raw = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "bitflip":
        raw[len(raw) // 2] ^= 0x10
        victim.write_bytes(bytes(raw))
    else:
        (victim.parent / "manifest.json").write_text("{ not json")
    resumed = ok(run_cli(*argv))
    expected = {"truncate": "(truncated)", "bitflip": "checksum mismatch", "manifest": "corrupt manifest"}[damage]
    warning = [line for line in resumed.stdout.splitlines() if f"WARNING skipping step-{STEPS}" in line]
    assert warning and expected in warning[0] and str(victim.parent) in warning[0], resumed.stdout[-2000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step-15'}" in resumed.stdout
    assert losses(run_dir) == losses(reference)


def test_no_valid_checkpoint_auto_starts_fresh_explicit_path_errors(tmp_path, cache_dir, tiny_text):
    run_dir = tmp_path / "run"
    argv = args(run_dir, cache_dir, tiny_text, "train.max_steps=4")
    ok(run_cli(*argv))
    ckpt = run_dir / "checkpoints" / "step-4"
    blob = ckpt / "optimizer.pt"
    blob.write_bytes(blob.read_bytes()[:-1])
    explicit = run_cli(*argv, f"checkpoint.resume={ckpt}")
    assert explicit.returncode == 2
    size = blob.stat().st_size
    last_line = explicit.stderr.strip().splitlines()[-1]
    assert last_line == f"error: {blob}: size {size}, manifest says {size + 1} (truncated)"
    fresh = ok(run_cli(*argv, "train.max_steps=6"))
    assert "WARNING skipping step-4" in fresh.stdout and "resumed from" not in fresh.stdout
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 7))
    missing = run_cli(*argv, f"checkpoint.resume={tmp_path / 'nope' / 'step-3'}")
    assert missing.returncode == 2 and "no such checkpoint directory" in missing.stderr


def test_checkpoint_from_a_different_model_is_a_clear_error(tmp_path, cache_dir, tiny_text):
    run_dir = tmp_path / "run"
    ok(run_cli(*args(run_dir, cache_dir, tiny_text, "train.max_steps=2")))
    proc = run_cli(*args(run_dir, cache_dir, tiny_text, "train.max_steps=4", "model.d_model=32"))
    assert proc.returncode == 2
    assert "written for a different model: model.d_model (64 vs 32)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unwritable_checkpoint_dir_stop_or_continue(tmp_path, cache_dir, tiny_text):
    run_dir = tmp_path / "run"
    argv = args(run_dir, cache_dir, tiny_text, "checkpoint.every_steps=4", "train.max_steps=8")
    ok(run_cli(*argv, "train.max_steps=4"))
    (run_dir / "checkpoints" / "step-4").chmod(0o755)
    # Replace the checkpoints directory by a file at the same path: every save fails.
    shutil.move(run_dir / "checkpoints", tmp_path / "kept")
    (run_dir / "checkpoints").write_text("not a directory")
    stopped = run_cli(*argv)
    assert stopped.returncode == 1
    assert "checkpoint: saving step-4 failed" in stopped.stderr and "Traceback" not in stopped.stderr
    cont = run_cli(*argv, "checkpoint.on_save_error=continue", "checkpoint.resume=never")
    assert cont.returncode == 0
    assert cont.stdout.count("saving step-") == 2 and "training continues" in cont.stdout
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")][-1] == 8
    assert (tmp_path / "kept" / "step-4" / "manifest.json").is_file()  # nothing already written was lost


def test_disk_full_keeps_previous_checkpoint(tmp_path, cache_dir, tiny_text):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root) to fill a disk")
    try:
        run_dir = mnt / "run"
        # One checkpoint (~1.6 MB with optimizer state) fits; a second one does not.
        argv = args(run_dir, cache_dir, tiny_text, "checkpoint.every_steps=3", "train.max_steps=6",
                    "checkpoint.keep_last=3")
        proc = run_cli(*argv)
        assert proc.returncode == 1, proc.stdout[-2000:]
        assert "checkpoint: saving step-6 failed" in proc.stderr and "disk full? only" in proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert f"previous checkpoint {run_dir / 'checkpoints' / 'step-3'} kept" in proc.stderr
        assert not (run_dir / "checkpoints" / "step-6.tmp").exists()
        from bigtrain.checkpoint import verify

        verify(run_dir / "checkpoints" / "step-3")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_signal_checkpoints_and_exits_for_requeue(tmp_path, reference, cache_dir, tiny_text, sig):
    run_dir = tmp_path / "run"
    argv = args(run_dir, cache_dir, tiny_text, "checkpoint.every_steps=100")
    proc = start(argv, env={"BIGTRAIN_TEST_STEP_DELAY_S": "0.2"})
    wait_for_step(run_dir, 5, proc)
    os.kill(proc.pid, sig)  # the training process itself (the launcher exec'd into it)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-2000:]
    saved = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert len(saved) == 1
    stopped_at = int(saved[0].name.split("-")[1])
    assert 5 <= stopped_at < STEPS
    assert f"preempted ({sig.name})" in out
    resumed = ok(run_cli(*argv))
    assert f"resumed from {saved[0]}" in resumed.stdout
    assert losses(run_dir) == losses(reference)


def test_retention_keep_last_and_keep_every_and_time_policy(tmp_path, cache_dir, tiny_text):
    run_dir = tmp_path / "run"
    ok(run_cli(*args(run_dir, cache_dir, tiny_text, "checkpoint.every_steps=2", "checkpoint.keep_last=2",
                     "checkpoint.keep_every=6", "train.max_steps=14")))
    names = sorted((p.name for p in (run_dir / "checkpoints").iterdir()), key=lambda n: int(n.split("-")[1]))
    assert names == ["step-6", "step-12", "step-14"]
    timed = tmp_path / "timed"
    proc = ok(run_cli(*args(timed, cache_dir, tiny_text, "checkpoint.every_minutes=0.002", "train.max_steps=6"),
                      env={"BIGTRAIN_TEST_STEP_DELAY_S": "0.15"}))
    saves = [line for line in proc.stdout.splitlines() if line.startswith("checkpoint: saved")]
    assert len(saves) >= 3, proc.stdout  # time-based saves, plus the final one


def test_async_checkpoints_commit_and_resume(tmp_path, reference, cache_dir, tiny_text):
    run_dir = tmp_path / "run"
    argv = args(run_dir, cache_dir, tiny_text, "checkpoint.every_steps=5", "checkpoint.async=true")
    first = ok(run_cli(*argv))
    assert first.stdout.count("writing in the background") == 3  # steps 5, 10, 15; the final save is sync
    out = run_dir / "checkpoints"
    assert sorted(p.name for p in out.iterdir()) == ["step-10", "step-15", "step-16", "step-5"]
    assert losses(run_dir) == losses(reference)  # saving in the background did not disturb training
    for name in ("step-16", "step-15"):
        shutil.rmtree(out / name)
    resumed = ok(run_cli(*argv))
    assert f"resumed from {out / 'step-10'}" in resumed.stdout
    assert losses(run_dir) == losses(reference)


def test_export_to_hugging_face_gives_the_same_logits(tmp_path, reference):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    proc = run_cli("export", str(reference), "--to", "hf", str(out))
    assert proc.returncode == 0, proc.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer.model"} <= {p.name for p in out.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    from bigtrain.data.tokenizer import Tokenizer

    sp = Tokenizer.load(reference / "tokenizer.model")
    text = "ROMEO:\nBut, soft! what light through yonder window breaks?"
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    assert tok.decode(sp.encode(text)) == text
    # The training model, rebuilt from the checkpoint by bigtrain's own code path:
    from bigtrain.config import load_config
    from bigtrain.models import build_causal_lm
    from bigtrain.strategies.single import load_model_file

    ckpt = reference / "checkpoints" / f"step-{STEPS}"
    cfg = load_config(ckpt / "config.yaml")
    ours = build_causal_lm(cfg.model, sp.vocab_size, cfg.train.seq_len).eval()
    load_model_file(ours, ckpt)
    ids = torch.tensor([sp.encode(text)])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ours(input_ids=ids).logits)
    again = run_cli("export", str(reference), "--to", "hf", str(out))
    assert again.returncode == 2 and "exists and is not empty" in again.stderr


def test_keep_best_keeps_the_best_evaluation_and_export_takes_it(tmp_path, cache_dir, tiny_text):
    """mode=max on val_loss makes the first evaluation the 'best' (the loss falls), so keeping it is
    visibly not keep_last's doing."""
    run_dir = tmp_path / "run"
    proc = ok(run_cli(*args(run_dir, cache_dir, tiny_text, "train.max_steps=12", "train.eval_every=3",
                            "checkpoint.every_steps=3", "checkpoint.keep_last=1",
                            "checkpoint.keep_best={metric: val_loss, mode: max}")))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-12", "step-3"]
    first = read_jsonl(run_dir / "eval.jsonl")[0]
    assert first["step"] == 3 and f"checkpoint: best so far: step-3 (val_loss {first['val_loss']:.4f})" in proc.stdout
    out = tmp_path / "hf"
    exported = run_cli("export", str(run_dir), "--to", "hf", str(out), "--best")
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert f"export: best checkpoint step-3 (val_loss {first['val_loss']:.4f})" in exported.stderr
    none = run_cli("export", str(tmp_path / "empty"), "--to", "hf", str(tmp_path / "x"), "--best")
    assert none.returncode == 2 and "no checkpoint was saved at an evaluation step" in none.stderr

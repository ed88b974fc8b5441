"""Single-process training on real text, as a user runs it (the CLI, in a subprocess)."""

import json
import socket
import time

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


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_names_a_closed_port_and_passes_a_listening_one():
    from bigtrain.tracking.wandb_run import unreachable

    port = unused_port()
    why = unreachable(f"http://127.0.0.1:{port}")
    assert why and f"127.0.0.1:{port}" in why
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert unreachable(f"https://127.0.0.1:{server.getsockname()[1]}") is None
    assert unreachable("https://api.example.invalid", timeout=0.2)  # no such host: no wait past the timeout


def test_a_failing_wandb_log_is_reported_once_and_wandb_is_dropped(tmp_path, monkeypatch):
    """A real offline W&B run, finished behind our back: the next log raises inside W&B; we say
    so once, stop calling W&B, and close cleanly."""
    from bigtrain.config import WandbSection
    from bigtrain.tracking.wandb_run import WandbRun

    monkeypatch.setenv("WANDB_MODE", "offline")
    lines = []
    run = WandbRun(WandbSection(mode="offline", project="bt-test"), "n", tmp_path, {"a": 1}, log=lines.append)
    run.log({"train/loss": 1.0}, 1)
    run.run.finish()
    run.log({"train/loss": 0.9}, 2)
    run.log({"train/loss": 0.8}, 3)
    run.close()
    assert len(lines) == 1 and lines[0].startswith("warning: W&B log failed at step 2 ("), lines
    assert "training goes on" in lines[0] and run.run is None


def test_wandb_online_with_the_server_unreachable_falls_back_to_offline_and_the_run_finishes(
        tmp_path, cache_dir, tiny_text):
    """A real W&B client, a real dead server (nothing listens on the port): the run logs W&B
    offline, says so and how to sync, and starts about as fast as a run without W&B."""
    args = ["train.max_steps=8", "train.eval_every=4", "train.sample_tokens=0", "checkpoint.save_final=false"]
    start = time.perf_counter()
    proc = run_cli(*train_args(tmp_path / "plain", cache_dir, tiny_text, *args))
    plain_s = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    run_dir = tmp_path / "run"
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "0123456789abcdef" * 2 + "01234567",
           "WANDB_BASE_URL": f"http://127.0.0.1:{unused_port()}", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")}
    start = time.perf_counter()
    proc = run_cli(*train_args(run_dir, cache_dir, tiny_text, *args, "tracking.wandb.mode=online",
                               "tracking.wandb.project=bt-test"), env=env)
    online_s = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    print(f"wall: online (fallback) {online_s:.1f} s, disabled {plain_s:.1f} s")
    assert online_s - plain_s < 15, (online_s, plain_s)
    fallback = [line for line in proc.stdout.splitlines() if "is unreachable" in line]
    assert fallback == [f"warning: W&B server {env['WANDB_BASE_URL']} is unreachable (127.0.0.1:"
                        f"{env['WANDB_BASE_URL'].rsplit(':', 1)[1]}: Connection refused): logging W&B offline; "
                        f"sync it later with `wandb sync {run_dir / 'wandb'}/offline-run-*`"], proc.stdout[-3000:]
    run_id = (run_dir / "wandb_id.txt").read_text()
    [offline] = (run_dir / "wandb").glob("offline-run-*")
    records = (offline / f"run-{run_id}.wandb").read_bytes()
    assert b"train/loss" in records and b"eval/val_loss" in records and b"bt-test" in records
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 9))


@pytest.mark.slow
def test_wandb_online_with_a_failing_server_falls_back_to_offline_after_init_timeout(tmp_path, cache_dir, tiny_text):
    """The server takes connections but answers every request with HTTP 500: wandb.init fails
    after WANDB_INIT_TIMEOUT, and the run logs W&B offline under the same run id instead."""
    import http.server
    import threading

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    run_dir = tmp_path / "run"
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "0123456789abcdef" * 2 + "01234567", "WANDB_INIT_TIMEOUT": "5",
           "WANDB_BASE_URL": f"http://127.0.0.1:{server.server_address[1]}",
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")}
    try:
        proc = run_cli(*train_args(run_dir, cache_dir, tiny_text, "train.max_steps=2", "train.sample_tokens=0",
                                   "checkpoint.save_final=false", "tracking.wandb.mode=online"), env=env)
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning: W&B")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: W&B online failed ("), proc.stdout[-3000:]
    sync = f"wandb sync {run_dir / 'wandb'}/offline-run-*"
    assert warnings[0].endswith(f"logging W&B offline; sync it later with `{sync}`"), warnings
    run_id = (run_dir / "wandb_id.txt").read_text()
    [offline] = (run_dir / "wandb").glob("offline-run-*")
    assert b"train/loss" in (offline / f"run-{run_id}.wandb").read_bytes()

"""One config, every engine: loss parity with the single process, sharded memory, offload,
and configuration errors caught before any process group exists. Real 2-rank runs (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bigtrain.config import ConfigError, load_config
from conftest import ENGINES as MATRIX_ENGINES
from conftest import MATRIX_STEPS, ROOT, read_jsonl, run_cli, train_args

STEPS = 10
ENGINES = {name: args for name, args in MATRIX_ENGINES.items() if name != "zero2-offload"}


def run(tmp_path_factory, cache_dir, tiny_text, name, nproc, *extra):
    run_dir = tmp_path_factory.mktemp(name) / "run"
    proc = run_cli(*train_args(run_dir, cache_dir, tiny_text, f"train.max_steps={STEPS}", "train.sample_tokens=0",
                               "checkpoint.save_final=false", "--nproc", str(nproc), *extra))
    assert proc.returncode == 0, f"{name}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return read_jsonl(run_dir / "metrics.jsonl")


@pytest.fixture(scope="module")
def fp32_runs(engine_reference):
    """Every engine's metrics next to the single process's, from the matrix's reference runs
    (MATRIX_STEPS steps; evaluations and checkpoints in between do not change the losses)."""
    runs = {"single": read_jsonl(engine_reference("single", nproc=1)[0] / "metrics.jsonl")}
    for name in ENGINES:
        runs[name] = read_jsonl(engine_reference(name)[0] / "metrics.jsonl")
    return runs


pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.mark.parametrize("engine", list(ENGINES))
def test_fp32_loss_parity_with_single_process(fp32_runs, engine):
    single = [m["loss"] for m in fp32_runs["single"]]
    other = [m["loss"] for m in fp32_runs[engine]]
    assert len(other) == MATRIX_STEPS
    assert other == pytest.approx(single, abs=1e-4)
    # the clipped global norm is the single-process norm
    assert [m["grad_norm"] for m in fp32_runs[engine]] == pytest.approx(
        [m["grad_norm"] for m in fp32_runs["single"]], rel=1e-3)


def test_bf16_runs_agree(tmp_path_factory, cache_dir, tiny_text):
    single = [m["loss"] for m in run(tmp_path_factory, cache_dir, tiny_text, "bf16-single", 1, "precision=bf16")]
    for name in ("ddp", "fsdp", "zero2"):
        losses = [m["loss"] for m in run(tmp_path_factory, cache_dir, tiny_text, f"bf16-{name}", 2, "precision=bf16",
                                         *ENGINES[name])]
        assert losses == pytest.approx(single, abs=2e-2), name
    assert single[-1] < single[0] - 0.5


def test_sharded_memory_per_rank(fp32_runs):
    mem = {name: fp32_runs[name][-1] for name in ENGINES}
    ddp = mem["ddp"]
    for name in ("fsdp", "zero3"):
        assert mem[name]["mem_param_bytes"] <= 0.55 * ddp["mem_param_bytes"], name
        assert mem[name]["mem_optimizer_state_bytes"] <= 0.55 * ddp["mem_optimizer_state_bytes"], name
    for name in ("zero1", "zero2"):
        assert mem[name]["mem_optimizer_state_bytes"] <= 0.55 * ddp["mem_optimizer_state_bytes"], name
    # What each engine really holds is named in the report.
    # DDP's buckets, as its reducer reports them, hold every gradient once (fp32)
    assert ddp["mem_ddp_bucket_bytes"] == ddp["mem_grad_bytes"] == ddp["mem_param_bytes"]
    assert mem["fsdp"]["mem_fsdp_unsharded_block_bytes_estimate"] > 0
    for name in ("zero1", "zero2", "zero3"):
        assert mem[name]["mem_ds_fp32_master_partition_bytes"] > 0
        assert mem[name]["mem_ds_reduce_bucket_bytes_estimate"] > 0


def test_activation_checkpointing_under_every_engine(tmp_path_factory, cache_dir, tiny_text, fp32_runs):
    for name in ("fsdp", "zero3"):
        losses = [m["loss"] for m in run(tmp_path_factory, cache_dir, tiny_text, f"ac-{name}", 2,
                                         "strategy.activation_checkpointing=true", "train.max_steps=4",
                                         *ENGINES[name])]
        assert losses == pytest.approx([m["loss"] for m in fp32_runs["single"][:4]], abs=1e-4), name


def probe(cache_dir, tiny_text, nproc, *overrides) -> list[dict]:
    """tests/recompute_probe.py's report from every rank."""
    args = [str(ROOT / "tests" / "recompute_probe.py"), str(ROOT / "tests" / "configs" / "gpt-test.yaml"),
            f"data.cache_dir={cache_dir}", f"data.path={tiny_text}", *overrides]
    launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    proc = subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    reports = [json.loads(line.split("PROBE ", 1)[1]) for line in proc.stdout.splitlines() if "PROBE " in line]
    assert len(reports) == nproc, proc.stdout
    return reports


def test_activation_checkpointing_recomputes_in_backward_and_saves_less(cache_dir, tiny_text):
    """Measured, not configured: with activation checkpointing every layer of a block runs forward
    again in backward, and autograd saves under half the activation bytes, under every engine."""
    (plain,) = probe(cache_dir, tiny_text, 1)
    assert plain["layer_forwards"] == plain["layers"]
    for engine in ("single", "fsdp", "zero3"):
        for report in probe(cache_dir, tiny_text, 1 if engine == "single" else 2, *ENGINES.get(engine, []),
                            "strategy.activation_checkpointing=true"):
            assert report["layer_forwards"] == 2 * plain["layers"], (engine, report)
            assert report["saved_bytes"] < 0.5 * plain["saved_bytes"], (engine, report, plain)


@pytest.mark.parametrize("engine, compiled", [("single", "optimizer AdamW, compiled"),
                                              ("ddp", "optimizer AdamW, compiled"), ("fsdp", "compiled 2 blocks"),
                                              ("zero3", "ZeRO-3, optimizer AdamW, compiled")])
def test_compile_under_every_engine(tmp_path, cache_dir, tiny_text, fp32_runs, engine, compiled):
    """single compiles the objective (forward and loss in one graph), DDP the wrapped model, FSDP2
    each block before sharding it, DeepSpeed through its engine."""
    where = ["--nproc", "1"] if engine == "single" else [*ENGINES[engine], "--nproc", "2"]
    proc = run_cli(*train_args(tmp_path / "run", cache_dir, tiny_text, "train.max_steps=3", "train.sample_tokens=0",
                               "checkpoint.save_final=false", "train.compile=true", *where))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert compiled in proc.stdout  # read from the modules / the engine, not from the config
    losses = [m["loss"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert losses == pytest.approx([m["loss"] for m in fp32_runs["single"][:3]], abs=1e-4)


def test_zero_offload_matches_non_offload(engine_reference, fp32_runs):
    run_dir, stdout = engine_reference("zero2-offload")
    # DeepSpeed's CPU Adam steps the offloaded state (named from the optimizer object it built)
    assert "ZeRO-2, optimizer DeepSpeedCPUAdam (offloaded)" in stdout
    offload = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["loss"] for m in offload] == pytest.approx([m["loss"] for m in fp32_runs["zero2"]], abs=1e-4)


@pytest.mark.parametrize("overrides, message", [
    (["strategy.name=megatron"], "strategy.name: input should be 'single', 'ddp', 'fsdp' or 'deepspeed'"),
    (["strategy.name=deepspeed", "strategy.deepspeed.stage=0", "strategy.deepspeed.offload_optimizer=true"],
     "strategy.deepspeed.offload_optimizer needs ZeRO stage 1, 2 or 3"),
    (["strategy.name=deepspeed", "strategy.deepspeed.extra={zero_optimization: {offload_optimizer: {device: cpu}}}"],
     "ZeRO-Offload cannot step a client (torch) optimizer"),
    (["strategy.deepspeed.extra={train_batch_size: 64}"], "strategy.deepspeed.extra.train_batch_size: set by bigtrain"),
])
def test_impossible_combinations_fail_at_validation(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "gpt-tiny.yaml", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_errors_before_any_process_group(tmp_path, cache_dir, tiny_text):
    fp16 = run_cli(*train_args(tmp_path / "a", cache_dir, tiny_text, "precision=fp16", "strategy.name=ddp",
                               "--nproc", "2"))
    assert fp16.returncode != 0
    assert "precision: fp16 needs CUDA GPUs" in fp16.stderr
    assert "init_process_group" not in fp16.stderr and "Traceback" not in fp16.stderr.split("error:")[0][-300:]
    odd = run_cli(*train_args(tmp_path / "b", cache_dir, tiny_text, "strategy.name=fsdp", "--nproc", "3"))
    assert odd.returncode == 2
    assert odd.stderr.strip() == ("error: train.global_batch_size (8) must be a multiple of "
                                  "train.micro_batch_size x world size (4 x 3)")


def test_deepspeed_engine_and_groups_are_freed_when_the_run_ends(tmp_path, cache_dir, tiny_text):
    """ZeRO's hooks kept the engine (and the groups it made) alive into interpreter teardown, where
    gloo aborted a finished job once. After a run, bigtrain has destroyed the engine and freed
    every group but (at most) torch's own world group."""
    args = train_args(tmp_path / "run", cache_dir, tiny_text, "train.max_steps=2", "train.sample_tokens=0",
                      "checkpoint.save_final=false", *ENGINES["zero2"])[1:]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           str(ROOT / "tests" / "teardown_probe.py"), *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    reports = [json.loads(line.split("TEARDOWN ", 1)[1]) for line in proc.stdout.splitlines() if "TEARDOWN " in line]
    assert sorted(r["rank"] for r in reports) == [0, 1], proc.stdout[-2000:]
    for report in reports:
        assert report["code"] == 0 and report["engines"] == 0, report
        assert report["gloo_threads"] <= 2, report  # one group's worker threads: torch's world group

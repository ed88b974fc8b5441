"""``bigtrain plan`` and the fit check before launches: the planner's arithmetic against the real
models (meta device), the activations autograd really saves (CPU), every engine's own memory
report at 2 ranks, and the H200 measurements; the command line and its one-line refusals."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import typing
from dataclasses import replace

import pytest
import torch

from bigtrain.config import ResourcesSection, load_config
from conftest import ENGINES, ROOT, TEST_CONFIG, TINY_SHAKESPEARE, read_jsonl, run_cli, train_args
from launcher.plan import DEVICE_NAMES, Setup, activations, cheapest_fit, device_named, estimate, plan_fit, shape_of
from launcher.plan.fit import ASSUMED_MFU, measured_mfu

DATA = f"data.path={TINY_SHAKESPEARE}"
GPT2_SMALL = ROOT / "configs" / "gpt2-small.yaml"
LLAMA_1B = ROOT / "configs" / "llama-1b.yaml"


def cfg_of(path=TEST_CONFIG, *overrides: str):
    return load_config(path, list(overrides))


# ---------------------------------------------------------------------------------------------
# The arithmetic against the models bigtrain builds
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [
    [],
    ["model.tie_embeddings=false", "model.d_ff=200", "model.max_seq_len=96"],
    ["model.name=llama"],
    ["model.name=llama", "model.n_head=8", "model.n_kv_head=2", "model.d_model=128", "model.tie_embeddings=false"],
    ["model.name=llama", "model.d_ff=300", "model.n_layer=3"],
])
def test_parameter_counts_and_flops_match_the_meta_device_model(overrides):
    from transformers import AutoModelForCausalLM

    from bigtrain.models import repeated_blocks
    from bigtrain.models.gpt import flops_per_token, hf_config

    cfg = cfg_of(TEST_CONFIG, *overrides)
    shape = shape_of(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(cfg.model, cfg.data.tokenizer.vocab_size,
                                                           cfg.train.seq_len))
    params = list(model.parameters())  # tied weights once
    assert shape.params == sum(p.numel() for p in params)
    assert shape.block_params == sum(p.numel() for p in repeated_blocks(model)[0].parameters())
    matmul = [m.weight for m in model.modules() if type(m).__name__ in ("Linear", "Conv1D")]
    assert shape.matmul_params == sum(w.numel() for w in {id(w): w for w in matmul}.values())
    assert shape.flops_per_token(cfg.train.seq_len) == flops_per_token(model, cfg.train.seq_len)


def _saved_bytes(cfg, dtype: torch.dtype, activation: str | None = None) -> int:
    """Bytes autograd saves for backward in one forward of ``cfg``'s model up to the logits
    (each storage once, parameters left out), the model cast to ``dtype`` as FSDP/DeepSpeed do;
    ``activation``: GPT-2's, if not bigtrain's."""
    from transformers import AutoModelForCausalLM

    from bigtrain.models.gpt import hf_config
    from bigtrain.strategies.base import enable_activation_checkpointing

    torch.manual_seed(0)
    config = hf_config(cfg.model, cfg.data.tokenizer.vocab_size, cfg.train.seq_len)
    if activation:
        config.activation_function = activation
    model = AutoModelForCausalLM.from_config(config).to(dtype).train()
    if cfg.strategy.activation_checkpointing:
        enable_activation_checkpointing(model)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, cfg.data.tokenizer.vocab_size, (cfg.train.micro_batch_size, cfg.train.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return sum(saved.values())


@pytest.mark.parametrize("model", ["gpt2", "llama"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_match_what_autograd_saves(model, precision, checkpointing):
    """fp32, and bf16 as FSDP/DeepSpeed run it (the model cast, no autocast), eager, with and
    without activation checkpointing: the planner's saved activations within 10% of the bytes
    autograd holds (up to the logits: the loss is the planner's separate transient)."""
    cfg = cfg_of(TEST_CONFIG, f"model.name={model}", "model.n_layer=3", "model.n_head=4", "model.n_kv_head=2",
                 "model.d_model=128", f"precision={precision}", "strategy.name=fsdp",
                 f"strategy.activation_checkpointing={str(checkpointing).lower()}")
    shape, setup = shape_of(cfg), Setup.from_config(cfg, 1, 1)
    predicted = activations(shape, setup).saved
    measured = _saved_bytes(cfg, torch.float32 if precision == "fp32" else torch.bfloat16)
    assert predicted == pytest.approx(measured, rel=0.10), (predicted, measured)


@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "gelu_new"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpt2_activations_by_gelu_kernel(precision, activation):
    """bigtrain's GPT-2 GELU (one kernel) and gelu_new (GPT-2 checkpoints: an element-wise chain
    that keeps every intermediate in eager mode), as the planner counts them (a checkpoint's
    config.json says which one it has). Not under autocast: CPU autocast runs GELU in fp32, CUDA's
    (what the planner plans for) in bf16."""
    cfg = cfg_of(TEST_CONFIG, "model.n_layer=3", "model.n_head=4", "model.d_model=128", f"precision={precision}",
                 "strategy.name=fsdp")
    shape = replace(shape_of(cfg), gelu_chain=activation == "gelu_new")
    measured = _saved_bytes(cfg, torch.float32 if precision == "fp32" else torch.bfloat16, activation=activation)
    assert activations(shape, Setup.from_config(cfg, 1, 1)).saved == pytest.approx(measured, rel=0.10)


def test_a_checkpoints_activation_decides_how_its_gelu_is_counted(tmp_path):
    for activation, chain in (("gelu_new", True), ("gelu_pytorch_tanh", False), (None, True)):
        spec = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 2, "vocab_size": 512,
                "n_positions": 128, **({"activation_function": activation} if activation else {})}
        (tmp_path / "config.json").write_text(json.dumps(spec))
        assert shape_of(cfg_of(TEST_CONFIG, f"model.pretrained={tmp_path}")).gelu_chain is chain, activation
    assert shape_of(cfg_of(TEST_CONFIG)).gelu_chain is False  # bigtrain's own GPT-2: one kernel


H200 = {  # measured on one H200: configs/gpt2-small.yaml, 12 x 768, vocab 8192, seq 1024, micro-batch 16, bf16
    # (when bigtrain built GPT-2 with gelu_new: the eager peak is that of the element-wise GELU chain)
    "params": 368.5e6, "grads": 368.5e6, "optimizer": 737.1e6, "peak_eager": 16.35e9, "peak_compiled": 9.14e9}


@pytest.mark.parametrize("compiled", [False, True])
def test_h200_measurements(compiled):
    cfg = cfg_of(GPT2_SMALL, "model.vocab_size=8192", "strategy.name=single", "train.global_batch_size=16",
                 f"train.compile={str(compiled).lower()}")
    shape = replace(shape_of(cfg), gelu_chain=True)
    assert shape.params == pytest.approx(92.1e6, rel=1e-3)
    est = estimate(shape, Setup.from_config(cfg, 1, 1))
    for term in ("params", "grads", "optimizer"):
        assert getattr(est, term) == pytest.approx(H200[term], rel=0.01)
    measured = H200["peak_compiled" if compiled else "peak_eager"]
    assert est.peak == pytest.approx(measured, rel=0.25)  # (the model is within 1%: 16.33 and 9.08 GB)


def test_zero_paper_model_states():
    """ZeRO (Rajbhandari et al., figure 1): 7.5B parameters on 64 GPUs, mixed-precision Adam
    (K=12): 120 GB per GPU replicated, 31.4 GB with P_os (ZeRO-1), 16.6 GB with P_os+g (ZeRO-2),
    1.9 GB with P_os+g+p (ZeRO-3)."""
    shape = shape_of(cfg_of(TEST_CONFIG, "model.name=llama", "model.n_layer=32", "model.d_model=4096",
                            "model.n_head=32", "model.d_ff=11008", "model.vocab_size=32000"))
    per_param = {}
    for stage in (0, 1, 2, 3):
        est = estimate(shape, Setup(precision="fp16", strategy="deepspeed", world=64, global_batch=64, stage=stage))
        per_param[stage] = est.states / shape.params
    assert per_param[0] == pytest.approx(16)
    assert per_param[1] == pytest.approx(4 + 12 / 64)
    assert per_param[2] == pytest.approx(2 + 14 / 64)
    assert per_param[3] == pytest.approx(16 / 64)


# ---------------------------------------------------------------------------------------------
# Each engine's own memory report at 2 ranks (real runs on the CPU, fp32)
# ---------------------------------------------------------------------------------------------

REPORTED = {"params": "mem_param_bytes", "grads": "mem_grad_bytes", "optimizer": "mem_optimizer_state_bytes",
            "master": "mem_ds_fp32_master_partition_bytes"}


def _compare(run_dir, world: int) -> dict[str, tuple[float, float]]:
    cfg = load_config(run_dir / "config.yaml")
    est = estimate(shape_of(cfg), Setup.from_config(cfg, world, 1))
    record = read_jsonl(run_dir / "metrics.jsonl")[-1]
    out = {}
    for term, key in REPORTED.items():
        if key in record:
            predicted = getattr(est, term) or est.offloaded.get(term, 0.0)
            out[term] = (predicted, record[key])
    return out


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero1", "zero2", "zero3", "zero2-offload"])
def test_model_states_match_the_engines_reports_at_two_ranks(engine_reference, engine):
    run_dir, _ = engine_reference(engine)
    compared = _compare(run_dir, 2)
    assert {"params", "grads", "optimizer"} <= set(compared)
    for term, (predicted, reported) in compared.items():
        assert predicted == pytest.approx(reported, rel=0.15), (engine, term, compared)
    total_predicted = sum(p for p, _ in compared.values())
    assert total_predicted == pytest.approx(sum(r for _, r in compared.values()), rel=0.15)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", "zero2"])
def test_model_states_match_the_engines_reports_in_bf16(tmp_path, cache_dir, tiny_text, engine):
    """bf16: FSDP keeps fp32 shards; ZeRO-2 whole bf16 parameters, a bf16 gradient partition and
    an fp32 master partition."""
    run_dir = tmp_path / "run"
    proc = run_cli(*train_args(run_dir, cache_dir, tiny_text, "train.max_steps=2", "train.sample_tokens=0",
                               "precision=bf16", *ENGINES[engine], "--nproc", "2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    compared = _compare(run_dir, 2)
    for term, (predicted, reported) in compared.items():
        assert predicted == pytest.approx(reported, rel=0.15), (engine, term, compared)


@pytest.mark.slow
def test_model_states_match_the_single_process_report(tmp_path, cache_dir, tiny_text):
    run_dir = tmp_path / "run"
    proc = run_cli(*train_args(run_dir, cache_dir, tiny_text, "train.max_steps=2", "train.sample_tokens=0"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for term, (predicted, reported) in _compare(run_dir, 1).items():
        assert predicted == pytest.approx(reported, rel=0.15), (term, predicted, reported)


# ---------------------------------------------------------------------------------------------
# Suggestions and time
# ---------------------------------------------------------------------------------------------


def test_the_cheapest_change_fits_and_names_what_to_change():
    cfg = cfg_of(LLAMA_1B, "strategy.activation_checkpointing=false", "resources.procs_per_node=1",
                 "resources.nodes=1")
    shape, setup, device = shape_of(cfg), Setup.from_config(cfg, 1, 1), device_named("a100-40g")
    fit = plan_fit(shape, setup, device)
    assert not fit.fits
    better = cheapest_fit(shape, setup, device)
    assert better is not None and better.fits and better.setup.world == 1
    assert setup.overrides(better.setup)  # something changed
    # nothing on one rank fits a 70B model in 40 GB: more ranks
    big = cfg_of(LLAMA_1B, "model.n_layer=80", "model.d_model=8192", "model.n_head=64", "model.n_kv_head=8",
                 "model.d_ff=28672", "train.micro_batch_size=1", "train.global_batch_size=64")
    setup = Setup.from_config(big, 8, 1)
    more = cheapest_fit(shape_of(big), setup, device)
    assert more is not None and more.setup.world > 8 and more.fits


def test_step_time_uses_a_measured_mfu(tmp_path):
    cfg = cfg_of(GPT2_SMALL)
    shape, setup, device = shape_of(cfg), Setup.from_config(cfg, 8, 1), device_named("h100")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "mfu": m}) + "\n"
                                                    for s, m in ((10, 0.05), (20, 0.2), (30, 0.3), (40, 0.25))))
    assert measured_mfu(str(tmp_path)) == 0.25  # the first record (warm-up) left out
    assumed = plan_fit(shape, setup, device).timing
    measured = plan_fit(shape, setup, device, mfu=0.25).timing
    assert assumed.mfu == ASSUMED_MFU and not assumed.measured and measured.measured
    tokens = setup.global_batch * setup.seq_len / 8
    assert measured.seconds == pytest.approx(shape.flops_per_token(setup.seq_len) * tokens / (989e12 * 0.25))


def test_gpu_types_are_the_config_choices():
    choices = typing.get_args(typing.get_args(ResourcesSection.model_fields["gpu_type"].annotation)[0])
    assert tuple(choices) == DEVICE_NAMES


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_plan_prints_the_terms_and_json():
    proc = run_cli("plan", str(GPT2_SMALL), "--gpu-type", "h100")
    assert proc.returncode == 0, proc.stderr
    for text in ("parameters", "optimizer state", "activations (saved)", "peak", "h100", "fits", "s/step"):
        assert text in proc.stdout
    proc = run_cli("plan", str(GPT2_SMALL), "--gpus", "16", "--nodes", "2", "--gpu-type", "a100-80g", "--json")
    plan = json.loads(proc.stdout)
    assert plan["setup"]["world"] == 16 and plan["setup"]["nodes"] == 2 and plan["fits"] is True
    assert plan["peak_bytes_with_ac"] < plan["peak_bytes_without_ac"]
    unknown = json.loads(run_cli("plan", str(GPT2_SMALL), "--json").stdout)
    assert unknown["fits"] is None and unknown["step_s"] is None and unknown["peak_bytes"] > 0


def test_plan_reads_the_mfu_of_a_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "mfu": 0.1}\n{"step": 2, "mfu": 0.3}\n')
    proc = run_cli("plan", str(GPT2_SMALL), "--gpu-type", "h100", "--run", str(tmp_path))
    assert proc.returncode == 0 and f"MFU 30% (measured in {tmp_path}" in proc.stdout


@pytest.mark.parametrize("args, expected", [
    (["plan", str(GPT2_SMALL), "--gpu-type", "v100"], "error: --gpu-type: unknown GPU type 'v100' (known: h100,"),
    (["plan", str(GPT2_SMALL), "resources.gpu_type=v100"], "error: resources.gpu_type: input should be"),
    (["plan", str(GPT2_SMALL), "optim.lr=-1"], "error: optim.lr: input should be greater than 0"),
    (["plan", str(GPT2_SMALL), "--gpus", "3"], "must be a multiple of train.micro_batch_size x world size"),
    (["plan", str(ROOT / "configs" / "resnet-tiny.yaml")], "error: plan: model.name 'resnet'"),
    (["plan", str(GPT2_SMALL), "--run", "/no/such/run"], "error: --run: cannot read /no/such/run/metrics.jsonl"),
    (["train", str(GPT2_SMALL), "--gpu-type", "tpu", "--dry-run"], "error: --gpu-type: unknown GPU type 'tpu'"),
])
def test_bad_input_is_one_line(args, expected):
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not proc.stdout


NO_FIT = [str(LLAMA_1B), DATA, "strategy.activation_checkpointing=false", "--gpu-type", "a100-40g", "--dry-run"]


@pytest.mark.parametrize("command", [
    ["train", *NO_FIT, "--nproc", "1"],
    ["launch", *NO_FIT, "--nproc-per-node", "1", "--nnodes", "1"],
    ["submit", *NO_FIT, "resources.procs_per_node=1", "resources.nodes=1"],
])
def test_a_launch_that_cannot_fit_is_refused_naming_the_change(tmp_path, command):
    proc = run_cli(*command, f"run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and not proc.stdout, proc.stderr
    assert line.startswith("error: plan: ") and "does not fit in" in line and "a100-40g" in line, line
    assert "try " in line and "=" in line and line.endswith("or pass --force"), line
    assert not (tmp_path / "r").exists()
    forced = run_cli(*command, f"run.dir={tmp_path / 'r'}", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "(--force: starting anyway)" in forced.stderr and forced.stdout


def test_a_launch_that_fits_prints_one_line_and_the_same_command():
    base = ["launch", str(GPT2_SMALL), DATA, "--dry-run"]
    plain = run_cli(*base)
    checked = run_cli(*base, "resources.gpu_type=h100")
    assert plain.returncode == checked.returncode == 0, checked.stderr
    assert plain.stderr == ""  # no device named: no check, no line
    line = checked.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith("plan: ") and line.endswith("fits"), line
    assert "GB/rank of" in line and "(h100 x 8)" in line and "s/step" in line
    argv = shlex.split(checked.stdout)
    assert "bigtrain.train" in argv and argv[-1] == "resources.gpu_type=h100"  # the command as without the check


def test_models_the_planner_does_not_know_are_not_checked():
    proc = run_cli("train", str(ROOT / "configs" / "resnet-tiny.yaml"), "--gpu-type", "h100", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("plan: not checked (model.name 'resnet'")


def test_the_readme_table_is_what_the_script_prints():
    proc = subprocess.run([sys.executable, "benchmarks/plan_table.py", "--markdown"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in (ROOT / "README.md").read_text(), "README table is stale: rerun the script"

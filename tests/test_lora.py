"""LoRA (model.lora, through peft) on a Hugging Face checkpoint: only the adapters train, the
optimizer state shrinks, checkpoints hold the adapters and resume exactly under every engine at 2
ranks, and export writes the merged model or the adapter, each reloading with the run's logits."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import ENGINES, read_jsonl, run_cli, train_args
from hf_checkpoints import hf_checkpoint
from test_checkpoint import losses, ok

LORA = ["model.lora={r: 4, alpha: 8}", "optim.lr=1e-2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_text):
    return hf_checkpoint(tmp_path_factory.mktemp("hf") / "gpt", tiny_text.read_text()[:200_000])


def lora_args(run_dir, cache_dir, tiny_text, checkpoint, *extra):
    return train_args(run_dir, cache_dir, tiny_text, f"model.pretrained={checkpoint}", "train.sample_tokens=0",
                      "train.max_steps=8", "checkpoint.every_steps=4", "checkpoint.keep_last=5", *LORA, *extra)


def test_only_the_adapters_train_and_export_merges_or_writes_them(tmp_path, cache_dir, tiny_text, checkpoint):
    run_dir = tmp_path / "lora"
    proc = ok(run_cli(*lora_args(run_dir, cache_dir, tiny_text, checkpoint)))
    assert re.search(r"M params \(0\.\d+M trainable: LoRA r=4\)", proc.stdout), proc.stdout[:2000]
    saved = load_file(str(run_dir / "checkpoints" / "step-8" / "model.safetensors"))
    assert saved and all("lora_" in k for k in saved), sorted(saved)[:5]  # the adapters alone
    full = tmp_path / "full"
    ok(run_cli(*train_args(full, cache_dir, tiny_text, f"model.pretrained={checkpoint}", "train.sample_tokens=0",
                           "train.max_steps=2")))
    lora_opt = read_jsonl(run_dir / "metrics.jsonl")[-1]["mem_optimizer_state_bytes"]
    full_opt = read_jsonl(full / "metrics.jsonl")[-1]["mem_optimizer_state_bytes"]
    assert 0 < lora_opt < 0.1 * full_opt, (lora_opt, full_opt)

    merged = run_cli("export", str(run_dir), "--to", "hf", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr[-2000:]
    diff = float(re.search(r"max \|logit difference\| after reload: (\S+)", merged.stdout).group(1))
    assert diff < 1e-5 and "LoRA adapters merged" in merged.stdout
    before, after = load_file(str(checkpoint / "model.safetensors")), load_file(str(tmp_path / "merged" /
                                                                                    "model.safetensors"))
    for key, value in before.items():  # adapters on c_attn (gpt2's default): only those weights moved
        assert torch.equal(value, after[key]) != ("c_attn.weight" in key), key

    adapter = run_cli("export", str(run_dir), "--to", "hf", str(tmp_path / "adapter"), "--adapter")
    assert adapter.returncode == 0, adapter.stderr[-2000:]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert float(re.search(r"after reload: (\S+)", adapter.stdout).group(1)) < 1e-5
    assert "PeftModel.from_pretrained" in adapter.stdout


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero2"])
def test_lora_resumes_exactly_at_two_ranks(tmp_path, cache_dir, tiny_text, checkpoint, engine):
    run_dir = tmp_path / "run"
    argv = lora_args(run_dir, cache_dir, tiny_text, checkpoint, *ENGINES[engine], "--nproc", "2")
    ok(run_cli(*argv))
    reference = losses(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-8")
    again = ok(run_cli(*argv))
    assert "resumed from" in again.stdout and "step-4" in again.stdout
    assert losses(run_dir) == reference
    ok(run_cli("export", str(run_dir), "--to", "hf", str(tmp_path / "hf")))  # consolidated from this engine


def test_target_modules_that_match_nothing_is_one_line(tmp_path, cache_dir, tiny_text, checkpoint):
    proc = run_cli(*lora_args(tmp_path / "run", cache_dir, tiny_text, checkpoint,
                              "model.lora={r: 4, target_modules: [q_proj]}"))
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.lora.target_modules: ['q_proj'] match no layer of GPT2LMHeadModel "
                           "(its linear layers: "), last

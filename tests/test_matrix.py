"""The combination matrix: every distributed engine at 2 real ranks (gloo) x {evaluation during
training, sync and async checkpoints, SIGKILL in the middle of a checkpoint write and exact
resume, export checked against the run's own validation loss}.

One uninterrupted reference run per engine is shared by its tests; it evaluates every 4 steps and
checkpoints every 4 steps (in the background where the engine can). This is the guard that a new
feature does not break a combination users run.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import ASYNC_ENGINES as ASYNC
from conftest import ENGINES, MATRIX_STEPS, matrix_args, read_jsonl, run_cli
from test_checkpoint import losses, ok

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = MATRIX_STEPS


def evals(run_dir) -> dict[int, float]:
    return {e["step"]: e["val_loss"] for e in read_jsonl(run_dir / "eval.jsonl")}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_eval_and_checkpoints_during_training(engine_reference, engine):
    run_dir, out = engine_reference(engine)
    assert sorted(evals(run_dir)) == [4, 8, 12]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-12", "step-4", "step-8"]
    written_in_background = out.count("writing in the background")
    assert written_in_background == (2 if engine in ASYNC else 0), out[-3000:]  # the final save is sync
    if engine not in ASYNC:
        assert "saves synchronously" in out
    assert ("optimizer DeepSpeedCPUAdam (offloaded)" in out) == engine.endswith("offload"), out[:3000]
    # Every engine computes the same model: losses and evaluations match DDP's.
    ddp_dir, _ = engine_reference("ddp")
    assert list(losses(run_dir).values()) == pytest.approx(list(losses(ddp_dir).values()), abs=1e-4)
    assert list(evals(run_dir).values()) == pytest.approx(list(evals(ddp_dir).values()), abs=1e-4)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_sigkill_during_a_checkpoint_write_then_exact_resume(tmp_path, engine_reference, cache_dir, tiny_text, engine):
    """Every rank is SIGKILLed while step-8 is being written (in the background for async
    engines, inside the engine's writer otherwise); the restart resumes from step-4 and its
    losses and evaluations are bit-identical to the uninterrupted run's."""
    ref_dir, _ = engine_reference(engine)
    run_dir = tmp_path / "run"
    fault = "checkpoint-in-flight@8" if engine in ASYNC else "checkpoint-engine-write@8"
    killed = run_cli(*matrix_args(run_dir, cache_dir, tiny_text, engine), env={"BIGTRAIN_FAULT": fault})
    assert killed.returncode != 0
    committed = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    assert "step-4" in committed and "step-8" not in committed, committed
    # Resume with synchronous saves: the two write the same state.
    again = ok(run_cli(*matrix_args(run_dir, cache_dir, tiny_text, engine, "checkpoint.async=false")))
    assert re.search(r"resumed from \S+/step-4 at step 4", again.stdout), again.stdout[-2000:]
    assert losses(run_dir) == losses(ref_dir)
    assert evals(run_dir) == evals(ref_dir)
    a, b = model_state(run_dir, STEPS), model_state(ref_dir, STEPS)
    assert all(torch.equal(a[k], b[k]) for k in a)


def model_state(run_dir, step: int) -> dict:
    """Consolidated weights of a checkpoint of any engine (what export uses)."""
    import yaml

    from bigtrain.config import validate
    from bigtrain.data.tokenizer import Tokenizer
    from bigtrain.export import load_model_weights
    from bigtrain.models import build_causal_lm

    ckpt = run_dir / "checkpoints" / f"step-{step}"
    cfg = validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
    vocab = Tokenizer.load(ckpt / "tokenizer.model").vocab_size
    model = build_causal_lm(cfg.model, vocab, cfg.train.seq_len)
    load_model_weights(json.loads((ckpt / "manifest.json").read_text())["strategy"], ckpt, model)
    return {k: v.clone() for k, v in model.state_dict().items()}


def hf_val_loss(hf_dir, run_dir) -> float:
    """The exported model's loss on the run's validation batches (the samples each of the 2 ranks
    evaluated), computed with transformers alone."""
    import torch
    import torch.nn.functional as F
    import yaml
    from transformers import AutoModelForCausalLM

    from bigtrain.config import validate
    from bigtrain.data.prepare import prepare_sources
    from bigtrain.data.stream import eval_batches

    cfg = validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
    (data,) = prepare_sources(cfg.data, log=lambda _msg: None)  # the run's prepared data (cached)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    t = cfg.train
    batch_losses = []
    with torch.no_grad():
        for rank in range(2):
            for x, y in eval_batches(data, t.seq_len, t.micro_batch_size, t.eval_batches, rank, 2):
                logits = model(input_ids=x).logits
                batch_losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1)).item())
    return sum(batch_losses) / len(batch_losses)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_export_reproduces_the_runs_validation_loss(tmp_path, engine_reference, engine):
    run_dir, _ = engine_reference(engine)
    out = tmp_path / "hf"
    ok(run_cli("export", str(run_dir), "--to", "hf", str(out)))
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    # an independent signal: transformers alone, on the run's validation samples
    assert hf_val_loss(out, run_dir) == pytest.approx(evals(run_dir)[STEPS], abs=1e-5)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    state = model_state(run_dir, STEPS)
    assert all(torch.equal(value, state[key]) for key, value in hf.state_dict().items())

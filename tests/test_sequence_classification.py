"""``task: sequence_classification`` on real sentences (GLUE SST-2) through the CLI: a BERT
classifier from scratch learns, fine-tuning a Hugging Face checkpoint uses its tokenizer's
[CLS] ... [SEP], resume is exact, 2 ranks match 1 process, and the export reloads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import ROOT, read_jsonl, run_cli
from hf_checkpoints import bert_checkpoint
from test_checkpoint import losses, ok

CONFIG = ROOT / "configs" / "bert-classifier-tiny.yaml"


def classify(run_dir, cache, sst2, *extra):
    train, dev = sst2
    return ["train", str(CONFIG), f"run.dir={run_dir}", f"data.cache_dir={cache}", f"data.path={train}",
            f"data.val_path={dev}", *extra]


def test_from_scratch_learns_sentiment(tmp_path, cache_dir, sst2):
    run_dir = tmp_path / "run"
    proc = ok(run_cli(*classify(run_dir, cache_dir, sst2, "train.max_steps=200", "train.eval_every=100",
                                "train.log_every=10")))
    evals = read_jsonl(run_dir / "eval.jsonl")
    assert [e["step"] for e in evals] == [100, 200]
    # SST-2 dev is balanced (51% positive): 0.62 is well above chance for 4k sentences, 200 steps
    assert evals[-1]["val_accuracy"] > 0.62, evals
    assert evals[-1]["val_loss"] < 0.69
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert "samples_per_s" in metrics[-1] and "tokens_per_s" not in metrics[-1] and metrics[-1]["mfu"] > 0
    assert "labels {'0': 1" in proc.stdout and "(4,000 training records)" in proc.stdout


def test_finetune_checkpoint_resumes_exactly_and_exports(tmp_path, cache_dir, sst2):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = [line.split("\t", 1)[1] for line in sst2[0].read_text().splitlines()[1:]]
    checkpoint = bert_checkpoint(tmp_path / "bert", texts)
    args = ["model.pretrained=" + str(checkpoint), "train.global_batch_size=16", "train.micro_batch_size=8",
            "train.log_every=1", "train.eval_batches=2"]
    full = tmp_path / "full"
    ok(run_cli(*classify(full, cache_dir, sst2, *args, "train.max_steps=8", "checkpoint.every_steps=4")))
    part = tmp_path / "part"
    ok(run_cli(*classify(part, cache_dir, sst2, *args, "train.max_steps=4")))
    resumed = ok(run_cli(*classify(part, cache_dir, sst2, *args, "train.max_steps=8")))
    assert "resumed from" in resumed.stdout
    assert losses(part) == losses(full)

    # the records were encoded by the checkpoint's tokenizer, with its special tokens
    hf_tok = AutoTokenizer.from_pretrained(checkpoint)
    # the training set is the one holding this checkpoint's tokenizer and 4,000 records (the shared cache
    # holds other tests' sets, MiniLM's WordPiece among them, and this run's 872-record dev set)
    ours = (checkpoint / "tokenizer.json").read_bytes()
    sets = [p for p in (cache_dir / "records").iterdir()
            if (p / "tokenizer.json").is_file() and (p / "tokenizer.json").read_bytes() == ours]
    manifests = {p: json.loads((p / "manifest.json").read_text()) for p in sets}
    assert sorted(m["records"] for m in manifests.values()) == [872, 4000], manifests
    records, manifest = next((p, m) for p, m in manifests.items() if m["records"] == 4000)
    assert manifest["tokenizer_file"] == "tokenizer.json"
    assert manifest["special_tokens_added"]
    offsets = np.load(records / "offsets.npy")
    tokens = np.fromfile(records / "tokens.bin", dtype=np.dtype(manifest["dtype"]))
    assert tokens[offsets[0]:offsets[1]].tolist() == hf_tok(texts[0])["input_ids"]
    assert tokens[offsets[0]] == hf_tok.cls_token_id and tokens[offsets[1] - 1] == hf_tok.sep_token_id

    out = tmp_path / "exported"
    ok(run_cli("export", str(full), "--to", "hf", str(out)))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "0", 1: "1"}
    assert AutoTokenizer.from_pretrained(out)(texts[1])["input_ids"] == hf_tok(texts[1])["input_ids"]


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_match_one_process(tmp_path, cache_dir, sst2):
    args = ["train.max_steps=6", "train.global_batch_size=16", "train.micro_batch_size=8", "train.log_every=1",
            "checkpoint.save_final=false", "model.dropout=0"]  # dropout draws differ per rank
    one = tmp_path / "one"
    ok(run_cli(*classify(one, cache_dir, sst2, *args)))
    two = tmp_path / "two"
    ok(run_cli(*classify(two, cache_dir, sst2, *args, "strategy.name=ddp", "--nproc", "2")))
    a, b = losses(one), losses(two)
    assert list(a) == list(range(1, 7))
    assert list(b.values()) == pytest.approx(list(a.values()), abs=1e-4)

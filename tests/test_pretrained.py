"""Hugging Face checkpoints as bigtrain loads them: before any training step its models give the
logits transformers gives for the same directory (causal LM, masked LM, classifier), and a BERT
checkpoint continues masked-LM pretraining with its own tokenizer and [MASK]."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

from bigtrain.config import ModelSection
from bigtrain.models import build_causal_lm
from bigtrain.models.bert import build_masked_lm, build_sequence_classifier
from conftest import ROOT, read_jsonl, run_cli, train_args
from hf_checkpoints import bert_checkpoint, hf_checkpoint
from test_checkpoint import ok

TEXT = ["the quick brown fox jumps over the lazy dog", "a film of great beauty and little sense",
        "what light through yonder window breaks"] * 20


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_text):
    root = tmp_path_factory.mktemp("hf")
    return {"gpt": hf_checkpoint(root / "gpt", tiny_text.read_text()[:200_000]),
            "mlm": bert_checkpoint(root / "mlm", TEXT, head="mlm"),
            "classifier": bert_checkpoint(root / "classifier", TEXT, head="classifier")}


@pytest.mark.parametrize("kind", ["gpt", "mlm", "classifier"])
def test_bigtrain_models_give_the_logits_of_transformers(checkpoints, kind):
    path = str(checkpoints[kind])
    if kind == "gpt":
        ours = build_causal_lm(ModelSection(name="gpt2", pretrained=path), 0, 16)
        theirs = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    elif kind == "mlm":
        ours = build_masked_lm(ModelSection(name="bert", pretrained=path), 0, 16, 0)
        theirs = AutoModelForMaskedLM.from_pretrained(path, local_files_only=True)
    else:
        ours = build_sequence_classifier(ModelSection(name="bert", pretrained=path), 0, 16, 0, ["0", "1"])
        theirs = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
    ids = torch.randint(5, theirs.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.eval()(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits)


def test_masked_lm_continues_a_bert_checkpoint_with_its_tokenizer(tmp_path, cache_dir, tiny_text, checkpoints):
    from bigtrain.config import load_config
    from bigtrain.data.mlm import IGNORE, MaskedLMStream
    from bigtrain.data.prepare import prepare_sources
    from bigtrain.data.tokenizer import load_tokenizer

    path = checkpoints["mlm"]
    run_dir = tmp_path / "run"
    args = train_args(run_dir, cache_dir, tiny_text, "task=masked_lm", "model.name=bert", f"model.pretrained={path}",
                      "train.max_steps=24", "train.sample_tokens=0", "train.eval_every=12", "optim.lr=2e-3")
    proc = ok(run_cli(*args))
    assert f"fine-tuning {path} (tokenizer: {path})" in proc.stdout
    losses = [m["loss"] for m in read_jsonl(run_dir / "metrics.jsonl")]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    # the batches were masked with the checkpoint's [MASK], never on its special tokens
    cfg = load_config(args[1], args[2:])
    data = prepare_sources(cfg.data, log=lambda _m: None)
    tok = load_tokenizer(data[0].tokenizer_path)
    batch = MaskedLMStream(data, cfg.train.seq_len, 8, 8, seed=cfg.seed).micro_batch_at(0)
    masked = batch["labels"] != IGNORE
    assert masked.any() and (batch["input_ids"][masked] == tok.piece_id("[MASK]")).float().mean() > 0.6
    specials = torch.tensor([tok.piece_id(t) for t in ("[SEP]", "[CLS]", "[PAD]")])
    assert not torch.isin(batch["labels"][masked], specials).any()
    exported = run_cli("export", str(run_dir), "--to", "hf", str(tmp_path / "hf"))  # reloads, compares logits
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


def test_a_pretrained_path_that_is_not_a_checkpoint_is_one_line(tmp_path):
    proc = run_cli("train", str(ROOT / "configs" / "bert-tiny.yaml"), f"model.pretrained={tmp_path}",
                   f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: model.pretrained: {tmp_path} is not a Hugging Face model directory "
                                   f"(no config.json)")


def test_an_exported_classifier_predicts_through_a_transformers_pipeline_as_it_evaluated(tmp_path, cache_dir,
                                                                                        checkpoints):
    from transformers import pipeline

    from test_eval_all import write_records

    write_records(tmp_path / "train.tsv", 96, 0)
    write_records(tmp_path / "val.tsv", 41, 1)
    run_dir = tmp_path / "run"
    ok(run_cli("train", str(ROOT / "configs" / "bert-classifier-tiny.yaml"),
               f"model.pretrained={checkpoints['classifier']}", f"data.path={tmp_path / 'train.tsv'}",
               f"data.val_path={tmp_path / 'val.tsv'}", f"data.cache_dir={cache_dir}", f"run.dir={run_dir}",
               "train.max_steps=60", "train.global_batch_size=8", "train.micro_batch_size=8",
               "train.eval_batches=all", "optim.lr=1e-3"))
    accuracy = read_jsonl(run_dir / "eval.jsonl")[-1]["val_accuracy"]
    out = tmp_path / "hf"
    ok(run_cli("export", str(run_dir), "--to", "hf", str(out)))
    rows = [line.split("\t", 1) for line in (tmp_path / "val.tsv").read_text().splitlines()[1:]]
    classify = pipeline("text-classification", model=str(out), device="cpu")
    predicted = [p["label"] for p in classify([text for _, text in rows])]
    assert round(accuracy * len(rows)) == sum(p == label for p, (label, _) in zip(predicted, rows))
    assert accuracy > 0.8 and set(predicted) == {"neg", "pos"}  # it learned the words' sentiment

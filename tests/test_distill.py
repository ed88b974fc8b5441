"""Knowledge distillation (``distill:``) through the real CLI: a distilled GPT student beats the
same student trained on the labels alone; checkpoints hold the student only and resume exactly;
2 ranks match 1 process; text and image classifiers distill (the loss is the KL: zero against a
teacher equal to the student); bad teachers and settings are one-line errors before training.
Every run uses one thread per rank (train.threads=1): these runs are small, and 2 threads on 2
shared cores are slower than one."""

from __future__ import annotations

import json
import random

import pytest

from conftest import ROOT, read_jsonl, run_cli, train_args, write_records
from test_checkpoint import losses, ok

# teacher: the test GPT (2 layers, d_model 64), 80 steps; student: 2 layers, d_model 32
TEACHER = ["train.max_steps=80", "optim.lr=5e-3", "train.sample_tokens=0", "train.threads=1"]
STUDENT = ["model.d_model=32", "optim.lr=1e-2", "train.sample_tokens=0", "train.threads=1"]


def kd(teacher, alpha=0.9, temperature=1.0):
    return [f"distill.teacher={teacher}", f"distill.alpha={alpha}", f"distill.temperature={temperature}"]


def one_line_error(proc, message):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: "), proc.stderr
    assert sum(line.startswith("error: ") for line in proc.stderr.splitlines()) == 1, proc.stderr


def test_kl_is_the_mean_over_targets_and_chunks_change_nothing():
    import torch
    import torch.nn.functional as F

    from bigtrain.losses import distillation_kl

    gen = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, 11, generator=gen, requires_grad=True)
    teacher = torch.randn(3, 5, 11, generator=gen)
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    labels[0, :2] = -100
    keep = labels != -100
    p_t = F.softmax(teacher[keep] / 2.0, -1)
    expected = (p_t * (p_t.log() - F.log_softmax(student[keep] / 2.0, -1))).sum(-1).mean() * 4.0
    plain = distillation_kl(student, teacher, labels, 2.0)
    assert plain.item() == pytest.approx(expected.item(), rel=1e-6)
    grad = torch.autograd.grad(plain, student)[0]
    chunked = distillation_kl(student, teacher, labels, 2.0, chunk_elements=22)  # 2 rows at a time
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    assert torch.allclose(torch.autograd.grad(chunked, student)[0], grad, atol=1e-7)
    assert distillation_kl(teacher, teacher, labels, 2.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def gpt_teacher(tmp_path_factory, cache_dir, tiny_text):
    run_dir = tmp_path_factory.mktemp("gpt-teacher") / "run"
    ok(run_cli(*train_args(run_dir, cache_dir, tiny_text, *TEACHER)))
    return run_dir


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, cache_dir, tiny_text, gpt_teacher):
    """An uninterrupted distilled run: 12 steps, evaluation and checkpoints every 4."""
    def argv(run_dir, *extra):
        return train_args(run_dir, cache_dir, tiny_text, *STUDENT, *kd(gpt_teacher), "train.max_steps=12",
                          "train.eval_every=4", "checkpoint.every_steps=4", "checkpoint.keep_last=10", *extra)

    run_dir = tmp_path_factory.mktemp("distilled") / "run"
    proc = ok(run_cli(*argv(run_dir)))
    return run_dir, proc.stdout, argv


@pytest.mark.slow
def test_distilled_student_beats_the_same_student_on_labels_alone(tmp_path, cache_dir, tiny_text, gpt_teacher):
    budget = [*STUDENT, "train.max_steps=40"]
    ok(run_cli(*train_args(tmp_path / "labels", cache_dir, tiny_text, *budget)))
    proc = ok(run_cli(*train_args(tmp_path / "kd", cache_dir, tiny_text, *budget, *kd(gpt_teacher))))
    assert f"distill: teacher {gpt_teacher}/checkpoints/step-80 (gpt2, " in proc.stdout
    teacher, labels, distilled = (read_jsonl(d / "eval.jsonl")[-1]["val_loss"]
                                  for d in (gpt_teacher, tmp_path / "labels", tmp_path / "kd"))
    print(f"val_loss: teacher {teacher:.4f}, student on labels {labels:.4f}, distilled student {distilled:.4f}")
    assert distilled < labels - 0.1, (teacher, labels, distilled)


@pytest.mark.slow
def test_checkpoints_hold_the_student_and_resume_exactly(tmp_path, distilled):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    reference, stdout, argv = distilled
    student = AutoModelForCausalLM.from_config(AutoConfig.for_model(**json.loads(
        (reference / "hf_config.json").read_text())))
    assert student.config.n_embd == 32
    shapes = {k: tuple(v.shape) for k, v in student.state_dict().items() if k != "lm_head.weight"}  # tied
    ckpt = reference / "checkpoints" / "step-12"
    saved = load_file(ckpt / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == shapes
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"]
    assert sum(s["exp_avg"].numel() for s in optim["state"].values()) == sum(p.numel() for p in student.parameters())
    assert not any(p.name.startswith("teacher") for p in ckpt.iterdir())

    # stopped by an error in step 7 (checkpoint step-4 committed), started again: bit-identical
    run_dir = tmp_path / "run"
    crashed = run_cli(*argv(run_dir), env={"BIGTRAIN_FAULT": "loop-error@7"})
    assert crashed.returncode == 1, crashed.stderr[-2000:]
    resumed = ok(run_cli(*argv(run_dir)))
    assert "resumed from" in resumed.stdout and "step-4" in resumed.stdout
    assert losses(run_dir) == losses(reference)
    assert read_jsonl(run_dir / "eval.jsonl")[-1] == read_jsonl(reference / "eval.jsonl")[-1]

    out = tmp_path / "hf"
    ok(run_cli("export", str(run_dir), "--to", "hf", str(out)))
    exported = json.loads((out / "config.json").read_text())
    assert (exported["n_embd"], exported["n_layer"]) == (32, 2)  # the student (the teacher: 64)


@pytest.mark.slow
def test_a_hugging_face_teacher_equals_its_run_directory(tmp_path, distilled, gpt_teacher):
    """The teacher exported by bigtrain export (its tokenizer converted to tokenizer.json, which the
    student then reads): the same token ids, the same logits, the same run."""
    reference, _, argv = distilled
    ok(run_cli("export", str(gpt_teacher), "--to", "hf", str(tmp_path / "teacher-hf")))
    proc = ok(run_cli(*argv(tmp_path / "run", f"distill.teacher={tmp_path / 'teacher-hf'}")))
    assert f"distill: teacher {tmp_path / 'teacher-hf'} (gpt2, " in proc.stdout
    assert losses(tmp_path / "run") == losses(reference)


@pytest.mark.dist
@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path, distilled):
    reference, _, argv = distilled
    ok(run_cli(*argv(tmp_path / "run", "strategy.name=fsdp", "--nproc", "2")))
    one, two = losses(reference), losses(tmp_path / "run")
    assert one.keys() == two.keys()
    for step in one:  # (val_loss differs: 20 eval batches of micro-batch x world size samples)
        assert two[step] == pytest.approx(one[step], abs=1e-4), (step, one[step], two[step])


# ---------------------------------------------------------------------------------------------
# classification: text (BERT) and images (ResNet)
# ---------------------------------------------------------------------------------------------

GOOD = "good great fine lovely happy bright kind warm".split()
BAD = "bad awful poor sad ugly dark cruel cold".split()
FILLER = ("the a this that day night film story song play book man woman child city house road sea sky tree "
          "river king queen dog cat bird").split()


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    """(train, val) .tsv records: a sentence is pos when it holds a GOOD word, neg with a BAD one."""
    root, rng = tmp_path_factory.mktemp("sentiment"), random.Random(0)

    def rows(n):
        out = []
        for _ in range(n):
            label = rng.choice(["neg", "pos"])
            words = rng.sample(FILLER, 5) + [rng.choice(GOOD if label == "pos" else BAD)]
            rng.shuffle(words)
            out.append((label, " ".join(words)))
        return out

    return write_records(root / "train.tsv", rows(512)), write_records(root / "val.tsv", rows(64))


def classify(run_dir, cache_dir, sentiment, *extra):
    return ["train", str(ROOT / "configs" / "bert-classifier-tiny.yaml"), f"run.dir={run_dir}",
            f"data.cache_dir={cache_dir}", f"data.path={sentiment[0]}", f"data.val_path={sentiment[1]}",
            "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.dropout=0", "data.tokenizer.vocab_size=320",
            "train.global_batch_size=16", "train.micro_batch_size=16", "train.seq_len=16", "train.log_every=1",
            "train.eval_batches=all", "train.threads=1", *extra]


@pytest.fixture(scope="module")
def text_teacher(tmp_path_factory, cache_dir, sentiment):
    """A classifier equal to its initialisation (one step at lr 1e-12): the student, built from the
    same config and seed, starts as this teacher."""
    run_dir = tmp_path_factory.mktemp("text-teacher") / "run"
    ok(run_cli(*classify(run_dir, cache_dir, sentiment, "train.max_steps=1", "optim.lr=1e-12")))
    return run_dir


def test_text_classifier_loss_mixes_the_kl_and_the_cross_entropy(tmp_path, cache_dir, sentiment, text_teacher):
    steps = ["train.max_steps=2", f"data.tokenizer.path={text_teacher / 'tokenizer.model'}"]
    ok(run_cli(*classify(tmp_path / "labels", cache_dir, sentiment, *steps)))
    proc = ok(run_cli(*classify(tmp_path / "kd", cache_dir, sentiment, *steps, *kd(text_teacher, 0.5, 2.0))))
    assert "distill: teacher" in proc.stdout and "(bert, " in proc.stdout
    ce, mixed = (read_jsonl(tmp_path / d / "metrics.jsonl")[0]["loss"] for d in ("labels", "kd"))
    assert ce == pytest.approx(0.69, abs=0.05)  # two labels, an untrained classifier
    # the student's first forward is the teacher's (same config and seed): 0.5 x KL (0) + 0.5 x CE
    assert mixed == pytest.approx(ce / 2, abs=1e-6)
    assert "val_accuracy" in read_jsonl(tmp_path / "kd" / "eval.jsonl")[-1]


def test_alpha_zero_trains_the_label_only_run(tmp_path, cache_dir, sentiment, text_teacher):
    """Loading the teacher draws initial weights: the random state is restored, so dropout (and
    everything else) runs as without it."""
    steps = ["train.max_steps=2", "model.dropout=0.1", f"data.tokenizer.path={text_teacher / 'tokenizer.model'}"]
    ok(run_cli(*classify(tmp_path / "labels", cache_dir, sentiment, *steps)))
    ok(run_cli(*classify(tmp_path / "kd", cache_dir, sentiment, *steps, *kd(text_teacher, 0.0))))
    assert losses(tmp_path / "kd") == losses(tmp_path / "labels")


@pytest.mark.slow
def test_image_classifier_distills(tmp_path):
    images = tmp_path / "images"

    def resnet(run_dir, *extra):
        return ["train", str(ROOT / "configs" / "resnet-tiny.yaml"), f"run.dir={run_dir}", f"data.path={images}",
                "data.download=digits", "train.global_batch_size=32", "train.micro_batch_size=32",
                "train.log_every=1", "train.eval_batches=2", "train.threads=1", *extra]

    ok(run_cli(*resnet(tmp_path / "teacher", "model.widths=[8,16]", "model.depths=[1,1]", "train.max_steps=10")))
    student = ["model.widths=[4,8]", "model.depths=[1,1]", "train.max_steps=3"]
    ok(run_cli(*resnet(tmp_path / "labels", *student)))
    proc = ok(run_cli(*resnet(tmp_path / "kd", *student, *kd(tmp_path / "teacher", 0.5, 2.0))))
    assert "distill: teacher" in proc.stdout
    ce, mixed = (read_jsonl(tmp_path / d / "metrics.jsonl")[0]["loss"] for d in ("labels", "kd"))
    kl = 2 * mixed - ce  # the same student, the same first batch: the CE is the label-only run's
    assert ce == pytest.approx(2.30, abs=0.3) and kl > 0.01, (ce, mixed)  # 10 classes; a teacher unlike the student
    assert {"val_loss", "val_accuracy"} <= set(read_jsonl(tmp_path / "kd" / "eval.jsonl")[-1])


# ---------------------------------------------------------------------------------------------
# errors: one line, exit 2, before training
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["distill.teacher=no/such/run"], "distill.teacher: no/such/run does not exist"),
    (["distill.teacher=configs"], "distill.teacher: configs is neither a bigtrain run directory"),
    (["distill.teacher=configs", "distill.alpha=1.5"], "distill.alpha: input should be less than or equal to 1"),
    (["distill.teacher=configs", "distill.temperature=0"], "distill.temperature: input should be greater than 0"),
    (["distill.teacher=configs", "task=masked_lm", "model.name=bert"],
     "distill: for causal_lm, sequence_classification and image_classification (task is 'masked_lm')"),
])
def test_bad_settings_are_one_line_errors(tmp_path, overrides, message):
    proc = run_cli("train", str(ROOT / "configs" / "gpt-tiny.yaml"), f"run.dir={tmp_path / 'run'}", *overrides)
    one_line_error(proc, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_teachers_that_do_not_fit_are_one_line_errors(tmp_path, cache_dir, tiny_text, gpt_teacher, sentiment,
                                                      text_teacher):
    proc = run_cli(*train_args(tmp_path / "gpt", cache_dir, tiny_text, *STUDENT, "train.max_steps=2",
                               *kd(gpt_teacher), "model.vocab_size=1024"))
    one_line_error(proc, "distill.teacher: the teacher's vocabulary has 512 entries, the student's 1024")

    def classifier(*extra):
        return run_cli(*classify(tmp_path / "cls", cache_dir, sentiment, "train.max_steps=2", *extra))

    one_line_error(classifier(*kd(text_teacher), "data.labels=[neg,pos,neutral]"),
                   "distill.teacher: the teacher classifies 2 labels ['neg', 'pos'], the student 3")
    one_line_error(classifier(*kd(text_teacher), f"data.tokenizer.path={gpt_teacher / 'tokenizer.model'}"),
                   "distill.teacher: the teacher's tokenizer")
    one_line_error(classifier(*kd(gpt_teacher)), "trained task 'causal_lm' (AutoModelForCausalLM); this run's student "
                                                 "needs a AutoModelForSequenceClassification teacher")

"""Tasks other than causal LM through the real CLI: BERT masked-LM pretraining and ResNet image
classification, on one process and on 2 ranks (gloo), with resume and Hugging Face export."""

from __future__ import annotations

import shutil

import pytest

from conftest import ROOT, read_jsonl, run_cli, train_args
from test_checkpoint import losses, ok

BERT = ["task=masked_lm", "model.name=bert", "train.sample_tokens=0"]


def images(tmp_path, *extra):
    """``train`` arguments for a tiny ResNet on synthetic 32x32 images (written on first use)."""
    return ["train", str(ROOT / "configs" / "resnet-tiny.yaml"), f"run.dir={tmp_path / 'run'}",
            f"data.path={tmp_path.parent / 'images'}", "data.download=synthetic-images", "precision=fp32",
            "model.widths=[8,16]", "model.depths=[1,1]",
            "train.global_batch_size=32", "train.micro_batch_size=16", "train.log_every=1", *extra]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Runs of this module live in subdirectories; they share one synthetic image set, ``images/``."""
    return tmp_path_factory.mktemp("imgs")


def test_bert_masked_lm_trains_resumes_exactly_and_exports(tmp_path, cache_dir, tiny_text):
    import torch
    from transformers import AutoModelForMaskedLM

    run_dir = tmp_path / "run"
    argv = train_args(run_dir, cache_dir, tiny_text, *BERT, "train.max_steps=30", "checkpoint.every_steps=10",
                      "checkpoint.keep_last=5")
    first = ok(run_cli(*argv))
    assert "masked_lm" in first.stdout and "val masked-token loss" in first.stdout
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert {"tokens_per_s", "samples_per_s", "mfu"} <= set(records[-1])
    start, end = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
    assert end < start - 0.5, (start, end)  # masked-token loss falls
    evals = read_jsonl(run_dir / "eval.jsonl")
    assert evals[-1]["val_loss"] < 6.2  # ln(512) = 6.24: better than uniform over the vocabulary
    full = losses(run_dir)

    # resume from step 10: the masks and dropout-free steps continue bit-identically
    for name in ("step-20", "step-30"):
        shutil.rmtree(run_dir / "checkpoints" / name)
    resumed = ok(run_cli(*argv))
    assert "step-10" in resumed.stdout
    assert losses(run_dir) == full

    out = tmp_path / "hf"
    exported = ok(run_cli("export", str(run_dir), "--to", "hf", str(out)))
    assert "AutoModelForMaskedLM" in exported.stdout
    model = AutoModelForMaskedLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, 6, model.config.vocab_size)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("engine", [["strategy.name=fsdp"], ["strategy.name=deepspeed", "strategy.deepspeed.stage=3"]])
def test_bert_on_two_ranks_matches_one_process(tmp_path, cache_dir, tiny_text, engine):
    ref, dist = tmp_path / "one", tmp_path / "two"
    ok(run_cli(*train_args(ref, cache_dir, tiny_text, *BERT, "train.max_steps=6", "checkpoint.save_final=false")))
    ok(run_cli(*train_args(dist, cache_dir, tiny_text, *BERT, "train.max_steps=6", "checkpoint.save_final=false",
                           "--nproc", "2", *engine)))
    a, b = losses(ref), losses(dist)
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), (step, a[step], b[step])


def test_resnet_learns_synthetic_images_and_exports(tmp_path, image_dir):
    import torch
    from transformers import AutoModelForImageClassification

    proc = ok(run_cli(*images(image_dir / "a", "train.max_steps=40", "train.eval_every=40")))
    assert "writing synthetic-images image sets" in proc.stdout
    for split, n in (("train", 4096), ("val", 512)):
        assert (image_dir / "images" / split / "manifest.json").is_file(), split
    run_dir = image_dir / "a" / "run"
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert "samples_per_s" in records[-1] and "tokens_per_s" not in records[-1]
    evals = read_jsonl(run_dir / "eval.jsonl")
    assert evals[-1]["val_accuracy"] > 0.5, evals  # 10 classes: chance is 0.1

    out = tmp_path / "hf"
    exported = ok(run_cli("export", str(run_dir), "--to", "hf", str(out)))
    assert "AutoModelForImageClassification" in exported.stdout
    assert "trust_remote_code=True" in exported.stdout  # 32 px: the CIFAR stem, exported with its code
    model = AutoModelForImageClassification.from_pretrained(out, trust_remote_code=True).eval()
    assert model.config.num_labels == 10 and model.config.stem == "cifar"
    with torch.no_grad():
        assert model(pixel_values=torch.zeros(1, 3, 32, 32)).logits.shape == (1, 10)


@pytest.mark.dist
@pytest.mark.slow
def test_resnet_engines_on_two_ranks(tmp_path, image_dir):
    """fp32 DDP equals the single process (BatchNorm statistics are per micro-batch either way);
    bf16 FSDP (BatchNorm kept in fp32) and bf16 ZeRO-3 (statistics cast with the parameters) train."""
    ok(run_cli(*images(image_dir / "one", "train.max_steps=6")))
    ok(run_cli(*images(image_dir / "ddp", "train.max_steps=6", "--nproc", "2", "strategy.name=ddp")))
    single, ddp = losses(image_dir / "one" / "run"), losses(image_dir / "ddp" / "run")
    for step in single:
        assert ddp[step] == pytest.approx(single[step], abs=1e-4), (step, single[step], ddp[step])
    for name, engine in (("fsdp", ["strategy.name=fsdp"]),
                         ("zero3", ["strategy.name=deepspeed", "strategy.deepspeed.stage=3"])):
        ok(run_cli(*images(image_dir / name, "train.max_steps=6", "precision=bf16", "--nproc", "2", *engine)))
        got = losses(image_dir / name / "run")
        for step in single:
            assert got[step] == pytest.approx(single[step], abs=0.05), (name, step, single[step], got[step])


@pytest.mark.dist
@pytest.mark.slow
def test_sync_batchnorm_on_two_ranks_equals_one_process_over_their_union(image_dir):
    """With sync_batchnorm, 2 ranks x micro-batch 16 (no accumulation: the two concurrent micro-batches
    are positions 0-31 of each step) normalize like one process with micro-batch 32: the same losses.
    With accumulation the concurrent micro-batches are no 1-process micro-batch (rank 1's starts
    half a global batch later), and without sync each rank normalizes over its own 16."""
    one = ["train.max_steps=4", "train.micro_batch_size=32", "train.eval_every=4"]
    ok(run_cli(*images(image_dir / "union", *one)))
    ref = losses(image_dir / "union" / "run")
    two = ["train.max_steps=4", "train.eval_every=4", "--nproc", "2"]
    for name, engine in (("sync-ddp", ["strategy.name=ddp"]), ("sync-fsdp", ["strategy.name=fsdp"])):
        ok(run_cli(*images(image_dir / name, *two, *engine, "model.sync_batchnorm=true")))
        got = losses(image_dir / name / "run")
        for step in ref:
            assert got[step] == pytest.approx(ref[step], abs=1e-5), (name, step, ref[step], got[step])
        val = [read_jsonl(image_dir / n / "run" / "eval.jsonl")[-1]["val_loss"] for n in ("union", name)]
        assert val[1] == pytest.approx(val[0], abs=1e-4), (name, val)  # the running statistics agree too
    ok(run_cli(*images(image_dir / "own-bn", *two, "strategy.name=ddp")))
    got = losses(image_dir / "own-bn" / "run")
    assert max(abs(got[step] - ref[step]) for step in ref) > 1e-4  # per-rank statistics: not the same run


@pytest.mark.parametrize("overrides, message", [
    (["model.name=bert"], "model.name: 'bert' cannot train task 'causal_lm' (expected gpt2 or llama)"),
    (["task=image_classification", "model.name=resnet"], "data.download: 'shakespeare' is not data for task"),
    (["task=masked_lm", "model.name=resnet"], "model.name: 'resnet' cannot train task 'masked_lm' (expected bert)"),
])
def test_task_and_model_must_fit(overrides, message):
    proc = run_cli("train", str(ROOT / "configs" / "gpt-tiny.yaml"), *overrides)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_image_errors_before_training(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("train", str(ROOT / "configs" / "resnet-tiny.yaml"), f"data.path={empty}", "data.download=null")
    assert proc.returncode == 2
    assert f"data.path: {empty} has no train/ directory" in proc.stderr, proc.stderr
    proc = run_cli("train", str(ROOT / "configs" / "resnet-tiny.yaml"), "data.path=[a,b]")
    assert proc.returncode == 2 and "data.path: image_classification needs one directory" in proc.stderr, proc.stderr
    proc = run_cli("train", str(ROOT / "configs" / "resnet-tiny.yaml"), "strategy.activation_checkpointing=true")
    assert proc.returncode == 2 and "not supported for resnet" in proc.stderr, proc.stderr


def test_channels_last_is_a_layout_not_a_different_model():
    """NHWC weights and images (model.channels_last): the same logits and gradients as NCHW, up
    to the convolutions' rounding; only for resnet."""
    import torch

    from bigtrain.config import ConfigError, ModelSection, load_config
    from bigtrain.models.resnet import build_resnet, to_channels_last

    section = ModelSection(name="resnet", widths=[8, 16], depths=[1, 1])
    torch.manual_seed(0)
    nchw = build_resnet(section, 3, 10, 32)
    nhwc = build_resnet(section, 3, 10, 32)
    nhwc.load_state_dict(nchw.state_dict())
    nhwc = to_channels_last(nhwc)
    conv = next(m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    images = torch.randn(4, 3, 32, 32)
    a, b = nchw(pixel_values=images).logits, nhwc(pixel_values=images).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.sum().backward()
    b.sum().backward()
    for (name, p), q in zip(nchw.named_parameters(), nhwc.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(ConfigError, match=r"model.channels_last: .*only for resnet \(model.name is 'gpt2'\)"):
        load_config(ROOT / "configs" / "gpt-tiny.yaml", ["model.channels_last=true"])


@pytest.mark.parametrize("strategy", ["single", "fsdp"])
def test_the_image_task_builds_the_layout_the_engine_takes(image_dir, strategy):
    """model.channels_last through the task: NHWC images always reach the first convolution; the
    weights are NHWC under single/ddp and stay contiguous for FSDP (it refuses other strides)."""
    import torch

    from bigtrain.config import load_config
    from bigtrain.dist import DistInfo
    from bigtrain.tasks import build_task

    argv = images(image_dir / "layout", "model.channels_last=true", f"strategy.name={strategy}")
    cfg = load_config(argv[1], argv[2:])
    task = build_task(cfg, DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo"), lambda _msg: None)
    task.prepare()
    model = task.build_model()
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) is (strategy == "single")
    seen = []
    conv.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous(
        memory_format=torch.channels_last)))
    model(pixel_values=torch.randn(2, 3, 32, 32))
    assert seen == [True]


@pytest.mark.dist
@pytest.mark.slow
def test_channels_last_under_every_engine_trains_like_the_default_layout_and_resumes_exactly(tmp_path, image_dir):
    """fp32, 6 steps: single, ddp, fsdp and ZeRO-2 at 2 ranks with NHWC weights and images follow the
    NCHW single run; a ddp run stopped after step 3 resumes from its checkpoint to the same losses."""
    steps = ["train.max_steps=6", "checkpoint.every_steps=3"]
    ok(run_cli(*images(image_dir / "nchw", *steps)))
    reference = losses(image_dir / "nchw" / "run")
    for name, engine in (("single", []), ("ddp", ["--nproc", "2", "strategy.name=ddp"]),
                         ("fsdp", ["--nproc", "2", "strategy.name=fsdp"]),
                         ("zero2", ["--nproc", "2", "strategy.name=deepspeed", "strategy.deepspeed.stage=2"])):
        ok(run_cli(*images(image_dir / f"nhwc-{name}", *steps, "model.channels_last=true", *engine)))
        got = losses(image_dir / f"nhwc-{name}" / "run")
        assert set(got) == set(reference), name
        for step in reference:
            assert got[step] == pytest.approx(reference[step], abs=1e-4), (name, step, reference[step], got[step])
    ddp_run = image_dir / "nhwc-ddp" / "run"
    step3 = ddp_run / "checkpoints" / "step-3"
    proc = ok(run_cli(*images(image_dir / "nhwc-resumed", *steps, "model.channels_last=true", "--nproc", "2",
                              "strategy.name=ddp", f"checkpoint.resume={step3}")))
    assert f"resumed from {step3} at step 3" in proc.stdout + proc.stderr, proc.stdout[-2000:]
    resumed, uninterrupted = losses(image_dir / "nhwc-resumed" / "run"), losses(ddp_run)
    assert resumed == {step: uninterrupted[step] for step in (4, 5, 6)}  # bit for bit

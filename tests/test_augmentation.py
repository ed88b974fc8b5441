"""Mixup, cutmix and label smoothing: drawn from (seed, position) whatever the batch layout, soft
targets in the loss, and a run with both resumes bit-identically."""

import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bigtrain.config import validate
from bigtrain.data.images import ImageStream, write_digits
from bigtrain.tasks.image_classification import ImageClassificationTask
from conftest import ROOT, read_jsonl, run_cli
from test_checkpoint import losses, ok


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("img") / "digits")


def stream(digits, **kw):
    return ImageStream(digits, **{"global_batch": 16, "micro_batch": 16, "seed": 5, **kw})


def test_mixed_samples_depend_on_their_position_alone(digits):
    one = stream(digits, mixup_alpha=0.4, cutmix_alpha=1.0).micro_batch_at(2)
    assert one["targets"].shape == (16, 10)
    assert torch.allclose(one["targets"].sum(1), torch.ones(16))
    assert (one["targets"].max(1).values < 1).sum() >= 8  # most samples are really mixed
    own = one["targets"][torch.arange(16), one["labels"]]
    assert (own >= 0).all()
    # two ranks with micro-batches of 4: the same positions give the same images and targets
    parts = [stream(digits, micro_batch=4, rank=r, world_size=2, mixup_alpha=0.4, cutmix_alpha=1.0)
             for r in (0, 1)]
    pieces = [parts[r].micro_batch_at(2 * 2 + m) for r in (0, 1) for m in (0, 1)]
    for key in ("images", "targets", "position"):
        assert torch.equal(torch.cat([p[key] for p in pieces]), one[key]), key
    other_seed = stream(digits, seed=6, mixup_alpha=0.4, cutmix_alpha=1.0).micro_batch_at(2)
    assert not torch.equal(other_seed["targets"], one["targets"])


def test_cutmix_pastes_one_box_whose_area_sets_the_weight(digits):
    plain = stream(digits).micro_batch_at(0)
    cut = stream(digits, cutmix_alpha=1.0).micro_batch_at(0)
    assert torch.equal(plain["labels"], cut["labels"])
    for image, ref, target, label in zip(cut["images"], plain["images"], cut["targets"], cut["labels"]):
        changed = (image != ref).any(0)
        if changed.any():  # the changed pixels lie in a box that covers (1 - weight of the own label)
            rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert box / 64 <= 1 - target[label] + 1e-6 or target.max() == 1  # a same-class partner: one-hot
    mixup = stream(digits, mixup_alpha=1.0).micro_batch_at(0)
    assert ((mixup["images"] != plain["images"]).flatten(1).float().mean(1) > 0.3).sum() >= 12  # blends everywhere


def task(label_smoothing=0.0):
    cfg = validate({"task": "image_classification", "model": {"name": "resnet"}, "data": {"path": "x"},
                    "train": {"label_smoothing": label_smoothing}})
    return ImageClassificationTask(cfg, SimpleNamespace(rank=0, world_size=1), print)


def test_label_smoothing_and_soft_targets_in_the_loss():
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 3, 9, 1, 2])
    model = lambda pixel_values: SimpleNamespace(logits=logits)  # noqa: E731 (the task calls the model)
    batch = {"images": torch.zeros(6, 1, 2, 2), "labels": labels}
    hard = task().objective(model, batch)
    assert hard.item() == pytest.approx(F.cross_entropy(logits, labels).item())
    logp = logits.log_softmax(-1)
    smoothed = task(0.1).objective(model, batch)  # (1 - e) x CE + e x the mean over classes of -log p
    assert smoothed.item() == pytest.approx((0.9 * hard - 0.1 * logp.mean(-1).mean()).item(), rel=1e-6)
    soft = torch.zeros(6, 10)
    soft[torch.arange(6), labels] = 0.7
    soft[torch.arange(6), (labels + 1) % 10] += 0.3
    mixed = task().objective(model, {**batch, "targets": soft})
    assert mixed.item() == pytest.approx(-(soft * logp).sum(-1).mean().item(), rel=1e-6)
    stats = task(0.1).eval_stats(model, batch)  # evaluation: hard labels, no smoothing
    assert (stats[0] / stats[1]).item() == pytest.approx(hard.item(), rel=1e-6)


def test_a_run_with_mixup_and_cutmix_resumes_bit_identically(tmp_path):
    run_dir = tmp_path / "run"
    argv = ["train", str(ROOT / "configs" / "resnet-tiny.yaml"), f"run.dir={run_dir}",
            f"data.path={tmp_path / 'images'}", "data.download=digits", "model.widths=[8,16]", "model.depths=[1,1]",
            "data.mixup_alpha=0.4", "data.cutmix_alpha=1.0", "train.label_smoothing=0.1", "train.max_steps=6",
            "train.global_batch_size=32", "train.micro_batch_size=16", "train.log_every=1", "train.eval_every=3",
            "checkpoint.every_steps=3", "checkpoint.keep_last=3"]
    ok(run_cli(*argv))
    full = losses(run_dir)
    assert len(full) == 6 and len(read_jsonl(run_dir / "eval.jsonl")) == 2
    shutil.rmtree(run_dir / "checkpoints" / "step-6")
    resumed = ok(run_cli(*argv))
    assert "resumed from" in resumed.stdout and "step-3" in resumed.stdout
    assert losses(run_dir) == full

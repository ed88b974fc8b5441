"""Image sets for the CNN baselines: digits and synthetic sets, normalization, augmentation,
rank x worker partitioning and exact resume, bad input."""

import json

import numpy as np
import pytest
import torch

from bigtrain.data.errors import DataError
from bigtrain.data.images import ImageStream, open_images, write_digits, write_synthetic
from bigtrain.data.stream import StatefulLoader


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("img") / "digits")


def read(loader, steps):
    out = []
    for _ in range(steps * loader.stream.accum):
        b = loader.next()
        out += list(zip(b["position"].tolist(), b["sample"].tolist(), b["labels"].tolist()))
    return out


def test_digits_round_trip_and_normalization(digits):
    from sklearn.datasets import load_digits

    ref = load_digits()
    m = open_images(digits, verify="checksum")
    assert m["shape"][1:] == [1, 8, 8] and m["num_classes"] == 10
    labels = np.load(digits / "labels.npy")
    assert labels.tolist() == [t for i, t in enumerate(ref.target.tolist()) if i % 10]
    s = ImageStream(digits, global_batch=len(labels), micro_batch=len(labels), augment=False)
    x = s.micro_batch_at(0)["images"]
    assert abs(x.mean().item()) < 1e-4 and x.std().item() == pytest.approx(1.0, abs=1e-3)


def test_synthetic_sets_have_the_shape_and_are_learnable(tmp_path):
    for res in (32, 64):
        root = write_synthetic(tmp_path / f"s{res}", n=600, resolution=res, num_classes=5, chunk=128)
        m = open_images(root, verify="checksum")
        assert m["shape"] == [600, 3, res, res] and m["num_classes"] == 5
    images = np.load(root / "images.npy").reshape(600, -1).astype(np.float32)
    labels = np.load(root / "labels.npy")
    train, test = slice(0, 400), slice(400, 600)
    means = np.stack([images[train][labels[train] == k].mean(0) for k in range(5)])
    pred = ((images[test][:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == labels[test]).mean() > 0.6  # chance is 0.2


def test_two_ranks_by_two_workers_cover_an_epoch_once(digits):
    n = open_images(digits)["shape"][0]
    steps = -(-n // 32)
    seen = []
    for rank in (0, 1):
        s = ImageStream(digits, global_batch=32, micro_batch=8, rank=rank, world_size=2)
        seen += read(StatefulLoader(s, num_workers=2, prefetch_factor=2), steps)
    positions = sorted(p for p, _, _ in seen)
    assert positions == list(range(steps * 32))
    assert sorted(s for p, s, _ in seen if p < n) == list(range(n))


def test_resume_on_another_world_size_gives_the_same_images(digits):
    ref = StatefulLoader(ImageStream(digits, global_batch=16, micro_batch=8, seed=3))
    want = [ref.next() for _ in range(10)]
    lo = StatefulLoader(ImageStream(digits, global_batch=16, micro_batch=4, rank=0, world_size=2, seed=3))
    for _ in range(6):
        lo.next()
    state = json.loads(json.dumps(lo.state_dict()))
    assert state["position"] == 3 * 16
    again = StatefulLoader(ImageStream(digits, global_batch=16, micro_batch=8, seed=3), num_workers=2)
    again.load_state_dict(state)
    for w in want[6:]:
        g = again.next()
        assert torch.equal(g["images"], w["images"]) and torch.equal(g["labels"], w["labels"])
    other = ImageStream(digits, global_batch=16, micro_batch=8, seed=4)
    assert not torch.equal(other.micro_batch_at(0)["sample"], want[0]["sample"])
    with pytest.raises(DataError, match="seed: 3 -> 4"):
        other.load_state_dict(state)


def test_augmentation_crops_and_flips_only_when_asked(digits):
    plain = ImageStream(digits, global_batch=64, micro_batch=64, augment=False).micro_batch_at(0)
    aug = ImageStream(digits, global_batch=64, micro_batch=64, augment=True).micro_batch_at(0)
    assert torch.equal(plain["sample"], aug["sample"])
    changed = [(not torch.equal(a, p)) for a, p in zip(aug["images"], plain["images"])]
    assert sum(changed) > 40
    flipped = sum(torch.equal(a, p.flip(-1)) for a, p in zip(aug["images"], plain["images"]))
    assert flipped > 0
    again = ImageStream(digits, global_batch=64, micro_batch=64, augment=True).micro_batch_at(0)
    assert torch.equal(again["images"], aug["images"])  # drawn from (seed, position)


def test_bad_image_sets_name_the_file(digits, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(digits, bad)
    labels = np.load(bad / "labels.npy")
    labels[5] = 12
    np.save(bad / "labels.npy", labels)
    with pytest.raises(DataError, match=r"labels.npy: label 12 at index 5 is outside \[0, 10\)"):
        open_images(bad)
    with pytest.raises(DataError, match=r"labels.npy: checksum mismatch"):
        open_images(bad, verify="checksum")
    with pytest.raises(ValueError, match="crop_padding 8"):
        ImageStream(digits, global_batch=8, micro_batch=8, crop_padding=8)
    raw = (bad / "images.npy").read_bytes()
    (bad / "images.npy").write_bytes(raw[:-100])
    with pytest.raises(DataError, match=r"images.npy: size .* \(truncated"):
        open_images(bad)
    (bad / "images.npy").unlink()
    with pytest.raises(DataError, match=r"images.npy: listed in manifest.json but missing"):
        open_images(bad)


def test_val_set_can_be_normalized_with_the_train_statistics(digits, tmp_path):
    val = write_digits(tmp_path / "val", split="val")
    own = ImageStream(val, global_batch=8, micro_batch=8, augment=False)
    with_train = ImageStream(val, global_batch=8, micro_batch=8, augment=False, normalize_with=digits)
    train_m = open_images(digits)
    assert with_train.mean.flatten().tolist() == pytest.approx(train_m["mean"])
    assert own.mean.flatten().tolist() != pytest.approx(train_m["mean"], abs=1e-9)
    raw = own.micro_batch_at(0)["images"] * own.std + own.mean
    assert torch.allclose(with_train.micro_batch_at(0)["images"], (raw - with_train.mean) / with_train.std, atol=1e-5)


def test_each_epoch_is_a_new_permutation_and_crops_shift_the_image(digits):
    n = open_images(digits)["shape"][0]
    s = ImageStream(digits, global_batch=n, micro_batch=n, augment=False)
    e0, e1 = s.micro_batch_at(0)["sample"], s.micro_batch_at(1)["sample"]
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(n))
    assert not torch.equal(e0, e1)
    plain = s.micro_batch_at(0)["images"][:64]
    aug = ImageStream(digits, global_batch=n, micro_batch=n, crop_padding=1,
                      flip=False).micro_batch_at(0)["images"][:64]
    shifts = set()
    for a, p in zip(aug, plain):  # pad 1: the interior 6x6 of a crop is the plain image moved by (dy, dx)
        shifts |= {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                   if torch.equal(a[:, 1:7, 1:7], p[:, 1 + dy:7 + dy, 1 + dx:7 + dx])}
    assert len(shifts - {(0, 0)}) >= 4

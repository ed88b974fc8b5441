"""Prepared token shards: the on-disk format, its manifest, verification and memory-mapped access.

A prepared data set is a directory::

    manifest.json        format, tokenizer (file, sha256, vocab), dtype, shards, stats
    tokenizer.model      SentencePiece model (or tokenizer.json + tokenizer_config.json: a
                         Hugging Face checkpoint's tokenizer)
    train-00000.bin ...  little-endian token ids (uint16 if the vocab fits, else uint32),
    val-00000.bin  ...   documents separated by the tokenizer's EOS id

The manifest is written last and the directory is renamed into place, so a directory with a
manifest is complete. Torch-free.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigtrain.data.digest_memo import DigestMemo
from bigtrain.data.errors import DataError

FORMAT = "bigtrain-tokens/2"  # 2: tokenizer with <pad> and <mask>/<cls>/<sep> control pieces
MANIFEST = "manifest.json"
VERIFIED = ".verified.json"  # the files' checksums found right, by file identity (not part of the set)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


@dataclass(frozen=True)
class PreparedData:
    """A verified prepared data set."""

    root: Path
    manifest: dict[str, Any]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.manifest["tokenizer"]["file"]

    def shard_paths(self, split: str) -> list[Path]:
        return [self.root / s["file"] for s in self.manifest["shards"] if s["split"] == split]

    def tokens(self, split: str) -> int:
        return sum(int(s["tokens"]) for s in self.manifest["shards"] if s["split"] == split)

    def memmaps(self, split: str) -> list[np.memmap]:
        return [np.memmap(p, dtype=self.dtype, mode="r") for p in self.shard_paths(split)]


def is_prepared_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def load_manifest(root: Path, fmt: str, what: str) -> dict[str, Any]:
    """``root/manifest.json`` of format ``fmt``, or a one-line DataError naming the file."""
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise DataError(f"{root}: not {what} (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{mpath}: corrupt manifest ({err.msg})") from None
    if manifest.get("format") != fmt:
        raise DataError(f"{mpath}: unsupported format {manifest.get('format')!r} (expected {fmt!r})")
    return manifest


def check_files(root: Path, entries: list[dict[str, Any]], verify: str = "size") -> None:
    """Every ``{"file", "bytes", "sha256"}`` entry exists with its size (and, with ``verify=
    "checksum"``, its sha256: read once, then remembered in ``root/VERIFIED`` while the file is
    unchanged, see :mod:`bigtrain.data.digest_memo`)."""
    memo = DigestMemo(root / VERIFIED) if verify == "checksum" else None
    for entry in entries:
        path = root / entry["file"]
        if not path.is_file():
            raise DataError(f"{path}: listed in {MANIFEST} but missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise DataError(f"{path}: size {size} bytes, manifest says {entry['bytes']} (truncated or replaced)")
        if memo is not None and not memo.verified(path, entry["sha256"], functools.partial(sha256_file, path)):
            raise DataError(f"{path}: checksum mismatch (sha256 differs from {MANIFEST}); re-run `bigtrain data "
                            f"prepare`")
    if memo is not None:
        memo.save()


def open_prepared(root: str | Path, verify: str = "size") -> PreparedData:
    """Open a prepared directory and check it. ``verify``: "size" (fast) or "checksum" (reads all)."""
    root = Path(root)
    manifest = load_manifest(root, FORMAT, "a prepared data set")
    tok = manifest["tokenizer"]
    tok_files = tok.get("files") or [{"file": tok["file"], "bytes": tok["bytes"], "sha256": tok["sha256"]}]
    check_files(root, tok_files + manifest["shards"], verify)
    data = PreparedData(root, manifest)
    if data.tokens("train") < 2:
        raise DataError(f"{root}: the train split holds fewer than 2 tokens")
    return data

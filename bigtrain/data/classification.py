"""Sequence classification: (text, label) records -> a prepared record set -> padded batches.

Records come from ``.tsv`` (a header row; columns ``text_field`` and ``label_field``; csv module,
tab delimiter, default quoting) or ``.jsonl`` (fields of the same names). Labels are compared as
strings. The label set is given, or inferred as the sorted distinct labels of the inputs (in
numeric order if they are all integers, so labels ``0..10`` get ids ``0..10``); a label outside a
given set, a line that is not JSON or a row with missing columns raises :class:`DataError`
naming the file and line (``on_bad_record="skip"`` counts and skips it, and logs how many).

A prepared record set is a directory: ``tokens.bin`` (all records' token ids back to back),
``offsets.npy`` (int64, N + 1), ``labels.npy`` (int64), the tokenizer's files (``tokenizer.model``,
or a Hugging Face ``tokenizer.json`` + config) and ``manifest.json``, built by
:func:`bigtrain.data.cache.build_set` (manifest last, then renamed into place). A Hugging Face
tokenizer encodes with the model's own special tokens (BERT: ``[CLS] text [SEP]``); with a
SentencePiece model :class:`ClassificationStream` prepends ``<cls>``. The stream pads each
micro-batch to its longest record.
:func:`prepare_cached` keys record sets by the content of their inputs and settings.

Bucketing (``bucket=True``): the global batch of a step (the same positions as without
bucketing) is sorted by record length (stably) and cut into groups of ``micro_batch``; group
``m * world_size + r`` is micro-batch ``m`` of rank ``r``. Micro-batches thus hold records of
similar lengths (less padding), the ranks run micro-batches of similar lengths side by side,
and every step still reads exactly the same records as without bucketing; which rank reads
which record of a step changes. The mapping depends only on (seed, step, global batch), so
resuming, with any world size, is exact.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigtrain.data.cache import build_set, file_entry, key_digest
from bigtrain.data.errors import BadRecords, DataError
from bigtrain.data.order import SampleOrder
from bigtrain.data.shards import (
    MANIFEST,
    check_files,
    load_manifest,
    sha256_file,
    token_dtype,
)
from bigtrain.data.sources import (
    content_fingerprint,
    jsonl_records,
    resolve_files,
    tsv_rows,
)
from bigtrain.data.stream import PositionalStream
from bigtrain.data.tokenizer import AnyTokenizer, load_tokenizer

FORMAT = "bigtrain-records/1"


def read_records(files: Sequence[Path], text_field: str = "text", label_field: str = "label",
                 bad: BadRecords | None = None) -> Iterator[tuple[str, str, str]]:
    """Yield (text, label as a string, "file:line")."""
    bad = bad if bad is not None else BadRecords()
    for f in map(Path, files):
        if f.suffix == ".jsonl":
            for where, rec in jsonl_records(f, bad):
                if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str) or label_field not in rec:
                    bad(where, f"expected an object with a string '{text_field}' and a '{label_field}'")
                    continue
                yield rec[text_field], str(rec[label_field]), where
        elif f.suffix == ".tsv":
            for where, row in tsv_rows(f, (text_field, label_field), bad):
                yield row[0], row[1], where
        else:
            raise DataError(f"{f}: classification records must be .tsv or .jsonl")


def _label_order(found: set[str]) -> list[str]:
    try:
        return sorted(found, key=int)
    except ValueError:
        return sorted(found)


def prepare_classification(files: Sequence[str | Path], tokenizer: AnyTokenizer, out_dir: str | Path,
                           labels: Sequence[str] | None = None, text_field: str = "text",
                           label_field: str = "label", on_bad_record: str = "error",
                           log=print) -> dict[str, Any]:
    """Tokenize the records of ``files`` into a record set at ``out_dir``; return its manifest."""
    bad = BadRecords(skip=on_bad_record == "skip")
    records = list(read_records([Path(f) for f in files], text_field, label_field, bad))
    names = [str(x) for x in labels] if labels is not None else _label_order({label for _, label, _ in records})
    if len(set(names)) != len(names):
        raise ValueError(f"the label set has duplicates: {names}")
    index = {name: i for i, name in enumerate(names)}
    kept = []
    for text, label, where in records:
        if label not in index:
            bad(where, f"label {label!r} is not in the label set {names}")
            continue
        kept.append((text, index[label]))
    if not kept:
        raise DataError(f"{files[0]}: no usable records")
    if bad.count:
        log(f"data: {bad.summary()}")
    texts = [t for t, _ in kept]
    specials = tokenizer.kind == "hf"
    ids = (tokenizer.encode_batch(texts, special=True) if specials
           else tokenizer.encode_batch(texts, threads=os.cpu_count() or 1))
    dtype = token_dtype(tokenizer.vocab_size)
    label_ids = np.array([lab for _, lab in kept], dtype=np.int64)

    def write(tmp: Path) -> dict[str, Any]:
        np.concatenate([np.asarray(x, dtype=dtype) for x in ids]).tofile(tmp / "tokens.bin")
        np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum([len(x) for x in ids])]).astype(np.int64))
        np.save(tmp / "labels.npy", label_ids)
        tokenizer.save_files(tmp)
        return {"format": FORMAT, "records": len(kept), "labels": names, "dtype": dtype.str,
                "label_counts": np.bincount(label_ids, minlength=len(names)).tolist(),
                "tokenizer_sha256": tokenizer.fingerprint, "tokenizer_file": tokenizer.main_file,
                "special_tokens_added": specials, "bad_records_skipped": bad.count,
                "sources": [{"path": str(f), "bytes": Path(f).stat().st_size, "sha256": sha256_file(Path(f))}
                            for f in files],
                "files": {n: file_entry(tmp / n)
                          for n in ("tokens.bin", "offsets.npy", "labels.npy", *tokenizer.file_names)}}

    return build_set(Path(out_dir), write, replace=True)


def prepare_cached(path, tokenizer: AnyTokenizer, cache_root: Path, labels: Sequence[str] | None = None,
                   text_field: str = "text", label_field: str = "label", on_bad_record: str = "error",
                   log=print) -> Path:
    """The record set of the files at ``path`` (a file, directory or glob), prepared into
    ``cache_root/<content hash>`` unless it already is there."""
    files = resolve_files(path)
    key = {"format": FORMAT, "inputs": content_fingerprint(files, memo_dir=cache_root),
           "tokenizer": tokenizer.fingerprint,
           "labels": list(labels) if labels is not None else None, "text_field": text_field,
           "label_field": label_field, "on_bad_record": on_bad_record}
    root = Path(cache_root) / key_digest(key)
    if (root / MANIFEST).is_file():
        log(f"data: using prepared records {root} (cached by content hash)")
        return root
    manifest = prepare_classification(files, tokenizer, root, labels, text_field, label_field, on_bad_record, log)
    log(f"data: {manifest['records']:,} records, labels {manifest['labels']} -> {root}")
    return root


def records_tokenizer(root: Path, manifest: dict[str, Any]) -> Path:
    """The tokenizer file of a record set (``tokenizer.json`` or ``tokenizer.model``)."""
    return Path(root) / manifest.get("tokenizer_file", "tokenizer.model")


def open_records(root: str | Path, verify: str = "size") -> dict[str, Any]:
    root = Path(root)
    manifest = load_manifest(root, FORMAT, "a prepared record set")
    check_files(root, [{"file": name, **entry} for name, entry in manifest["files"].items()], verify)
    return manifest


class ClassificationStream(PositionalStream):
    """``{"input_ids", "attention_mask", "labels", "sample", "position"}``, padded per micro-batch."""

    def __init__(self, root: str | Path, global_batch: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, max_len: int = 512, bucket: bool = False, add_cls: bool = True,
                 shuffle: bool = True, shuffle_buffer: int = 16384):
        super().__init__(global_batch, micro_batch, rank, world_size)
        self.root = Path(root)
        self.manifest = open_records(self.root)
        tok = load_tokenizer(records_tokenizer(self.root, self.manifest))
        add_cls = add_cls and not self.manifest.get("special_tokens_added", False)
        self.pad_id, self.cls_id = tok.pad_id, tok.piece_id("<cls>") if add_cls else None
        self.seed, self.max_len, self.bucket = seed, max_len, bucket
        self.order = SampleOrder(self.manifest["records"], seed, shuffle_buffer=shuffle_buffer, shuffle=shuffle)
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._bucketed: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None, "_bucketed": (-1, np.empty(0, dtype=np.int64))}

    def _open(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = (np.memmap(self.root / "tokens.bin", dtype=np.dtype(self.manifest["dtype"]), mode="r"),
                            np.load(self.root / "offsets.npy", mmap_mode="r"),
                            np.load(self.root / "labels.npy", mmap_mode="r"))
        return self._arrays

    @property
    def num_samples(self) -> int:
        return self.order.num_samples

    def fingerprint(self) -> dict[str, Any]:
        return {"records": self.manifest["files"]["tokens.bin"]["sha256"], "seed": self.seed,
                "shuffle": self.order.shuffle, "shuffle_buffer": self.order.shuffle_buffer, "bucket": self.bucket,
                "max_len": self.max_len, "cls": self.cls_id is not None}

    def lengths(self, samples: np.ndarray) -> np.ndarray:
        """Row lengths (with ``<cls>``, truncated to ``max_len``) of these records."""
        _, offsets, _ = self._open()
        samples = np.asarray(samples, dtype=np.int64)
        n = np.asarray(offsets[samples + 1] - offsets[samples]) + (self.cls_id is not None)
        return np.minimum(n, self.max_len)

    def positions(self, index: int) -> np.ndarray:
        if not self.bucket:
            return super().positions(index)
        step, micro = divmod(index, self.accum)
        first = self.start + step * self.global_batch
        if self._bucketed[0] != first:  # sort the step's global batch once (per worker)
            batch = np.arange(first, first + self.global_batch, dtype=np.int64)
            lengths = self.lengths(self.order.samples(first, self.global_batch))
            self._bucketed = (first, batch[np.argsort(lengths, kind="stable")])
        group = micro * self.world_size + self.rank
        return self._bucketed[1][group * self.micro_batch:(group + 1) * self.micro_batch]

    def build(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        tokens, offsets, labels = self._open()
        ids = [self.order.sample_at(int(p)) for p in positions]
        rows = []
        for i in ids:
            row = np.asarray(tokens[offsets[i]:offsets[i + 1]], dtype=np.int64)
            if self.cls_id is not None:
                row = np.concatenate([[self.cls_id], row])
            rows.append(row[: self.max_len])
        width = max(len(r) for r in rows)
        x = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, r in enumerate(rows):
            x[k, : len(r)] = torch.from_numpy(r)
            mask[k, : len(r)] = 1
        return {"input_ids": x, "attention_mask": mask, "labels": torch.from_numpy(np.asarray(labels[ids])),
                "sample": torch.tensor(ids), "position": torch.from_numpy(np.asarray(positions))}

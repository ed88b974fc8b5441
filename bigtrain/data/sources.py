"""Raw text sources: resolve ``data.path`` to inputs and iterate their documents.

Inputs, by suffix:

- ``.txt``: the whole file is one document;
- ``.jsonl``: one JSON object per line, the document under ``data.text_field``;
- ``.parquet``: one document per row, column ``data.text_field`` (read in record batches);
- ``.tsv``: a header row, then one document per row, column ``data.text_field``;
- a directory written by ``datasets.Dataset.save_to_disk``: one document per row.

With ``data.reader: hf`` the files are read through ``datasets.load_dataset(<json|text|parquet|csv>,
data_files=..., streaming=True)`` instead (note: its ``text`` builder yields one document per
line). A record that cannot be read raises :class:`DataError` naming the file and line, unless
``data.on_bad_record: skip``, which counts and reports it instead. A :class:`DocumentPass` lets the
tokenizer's sample and the encoding share one read of the documents. Torch-free.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import itertools
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bigtrain.data.digest_memo import INPUT_DIGESTS, DigestMemo
from bigtrain.data.errors import BadRecords, DataError

FILE_SUFFIXES = (".txt", ".jsonl", ".parquet", ".tsv")
HF_BUILDERS = {".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".tsv": "csv"}


def is_hf_saved_dir(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _as_list(path: str | Sequence[str]) -> list[str]:
    return [path] if isinstance(path, str) else list(path)


def resolve_files(path: str | Sequence[str]) -> list[Path]:
    """Expand files, directories (recursively) and globs into a sorted list of inputs.
    A ``save_to_disk`` directory is one input."""
    files: list[Path] = []
    for entry in _as_list(path):
        entry = os.path.expanduser(entry)
        if any(ch in entry for ch in "*?["):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise DataError(f"data.path: glob '{entry}' matches no files")
            files.extend(Path(m) for m in matches if Path(m).is_file() or is_hf_saved_dir(Path(m)))
        elif is_hf_saved_dir(Path(entry)):
            files.append(Path(entry))
        elif os.path.isdir(entry):
            found = sorted(p for p in Path(entry).rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
            if not found:
                raise DataError(f"data.path: directory '{entry}' holds no {'/'.join(FILE_SUFFIXES)} files")
            files.extend(found)
        elif os.path.isfile(entry):
            files.append(Path(entry))
        else:
            raise DataError(f"data.path: no such file or directory: '{entry}'")
    for f in files:
        if f.suffix not in FILE_SUFFIXES and not is_hf_saved_dir(f):
            raise DataError(f"data.path: '{f}' is not a {', '.join(FILE_SUFFIXES)} file or a save_to_disk directory")
    return files


def _text_of(record: Any, text_field: str, where: str, bad: BadRecords) -> str | None:
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        bad(where, f"expected a record with a string field '{text_field}'")
        return None
    return record[text_field]


def jsonl_records(f: Path, bad: BadRecords) -> Iterator[tuple[str, Any]]:
    """("file:line", parsed JSON) for every non-blank line of a .jsonl file."""
    with open(f, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad(f"{f}:{lineno}", f"not UTF-8 (byte {err.start})")
                continue
            if not line.strip():
                continue
            try:
                yield f"{f}:{lineno}", json.loads(line)
            except json.JSONDecodeError as err:
                bad(f"{f}:{lineno}", f"not valid JSON ({err.msg})")


def tsv_rows(f: Path, columns: Sequence[str], bad: BadRecords) -> Iterator[tuple[str, list[str]]]:
    """("file:line", [values of ``columns``]) for every row of a .tsv file with a header row."""
    csv.field_size_limit(sys.maxsize)
    with open(f, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader, None)
        if header is None:
            return
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(f"{f}:1: header has no column '{missing[0]}' (columns: {', '.join(header)})")
        index = [header.index(c) for c in columns]
        for row in reader:
            if len(row) != len(header):
                bad(f"{f}:{reader.line_num}", f"{len(row)} columns, the header has {len(header)}")
                continue
            yield f"{f}:{reader.line_num}", [row[i] for i in index]


def _jsonl(f: Path, text_field: str, bad: BadRecords) -> Iterator[str | None]:
    for where, record in jsonl_records(f, bad):
        yield _text_of(record, text_field, where, bad)


def _tsv(f: Path, text_field: str, bad: BadRecords) -> Iterator[str | None]:
    for _, row in tsv_rows(f, (text_field,), bad):
        yield row[0]


def _parquet(f: Path, text_field: str, bad: BadRecords) -> Iterator[str | None]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as err:  # pyarrow raises several types for a broken file
        raise DataError(f"{f}: not a readable parquet file ({err})") from None
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"{f}: no column '{text_field}' (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                bad(f"{f}:row {row}", f"column '{text_field}' is {type(value).__name__}, not a string")
                continue
            yield value


def _hf_saved(d: Path, text_field: str, bad: BadRecords) -> Iterator[str | None]:
    import datasets

    ds = datasets.load_from_disk(str(d))
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{d}: a DatasetDict ({', '.join(ds)}); point data.path at one split's directory")
    if text_field not in ds.column_names:
        raise DataError(f"{d}: no column '{text_field}' (columns: {', '.join(ds.column_names)})")
    for row, value in enumerate(ds.select_columns([text_field]).iter(batch_size=4096)):
        for i, text in enumerate(value[text_field]):
            if not isinstance(text, str):
                bad(f"{d}:row {row * 4096 + i + 1}", f"column '{text_field}' is not a string")
                continue
            yield text


def _hf_stream(files: Sequence[Path], text_field: str, bad: BadRecords) -> Iterator[str | None]:
    import datasets

    for f in files:  # one file at a time, so errors can name the file
        builder = HF_BUILDERS[f.suffix]
        kwargs = {"delimiter": "\t"} if f.suffix == ".tsv" else {}
        stream = datasets.load_dataset(builder, data_files=[str(f)], split="train", streaming=True, **kwargs)
        field_name = "text" if builder == "text" else text_field
        try:
            for row, record in enumerate(stream, 1):
                yield _text_of(record, field_name, f"{f}:{row}", bad)
        except DataError:
            raise
        except Exception as err:  # the builders raise their own types (ArrowInvalid, ...)
            first = str(err).splitlines()[0]
            raise DataError(f"{f}: datasets could not read it ({type(err).__name__}: {first})") from None


def iter_documents(files: Sequence[Path], text_field: str = "text", bad: BadRecords | None = None,
                   reader: str = "native") -> Iterator[str]:
    """Yield non-empty documents in input order."""
    bad = bad if bad is not None else BadRecords()
    if reader == "hf":
        plain = [f for f in files if not is_hf_saved_dir(f)]
        streams = [_hf_stream(plain, text_field, bad)] + [_hf_saved(f, text_field,
                                                                    bad) for f in files if f not in plain]
    else:
        streams = (_open(f, text_field, bad) for f in files)
    for stream in streams:
        for doc in stream:
            if doc:
                yield doc


class DocumentPass:
    """One read of a source's documents, shared by the tokenizer's sample and the encoding.

    The documents drawn by :meth:`first` and :meth:`sample` are kept; iterating replays them and
    then reads on where they stopped, so training a tokenizer on a prefix of the source and then
    encoding all of it reads each input once. Memory: the kept documents (about the sample).
    """

    def __init__(self, documents: Iterable[str]):
        self._rest = iter(documents)
        self._kept: list[str] = []

    def first(self) -> str | None:
        """The first document (kept), or None if the source has none."""
        if not self._kept:
            self._kept.extend(itertools.islice(self._rest, 1))
        return self._kept[0] if self._kept else None

    def sample(self) -> Iterator[str]:
        """The documents from the start; every one drawn here is kept for the encoding pass."""
        i = 0
        while True:
            if i == len(self._kept):
                doc = next(self._rest, None)
                if doc is None:
                    return
                self._kept.append(doc)
            yield self._kept[i]
            i += 1

    def __iter__(self) -> Iterator[str]:
        """Every document once, in order (iterate once: the kept documents are handed over)."""
        kept, self._kept = self._kept, []
        yield from kept
        yield from self._rest


def _open(f: Path, text_field: str, bad: BadRecords) -> Iterator[str | None]:
    if is_hf_saved_dir(f):
        return _hf_saved(f, text_field, bad)
    if f.suffix == ".jsonl":
        return _jsonl(f, text_field, bad)
    if f.suffix == ".tsv":
        return _tsv(f, text_field, bad)
    if f.suffix == ".parquet":
        return _parquet(f, text_field, bad)
    return _txt(f, bad)


def _txt(f: Path, bad: BadRecords) -> Iterator[str | None]:
    try:
        yield f.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        bad(str(f), f"not UTF-8 text (byte {err.start})")


def _input_files(f: Path) -> list[Path]:
    return sorted(p for p in f.rglob("*") if p.is_file()) if f.is_dir() else [f]


def input_bytes(files: Sequence[Path]) -> int:
    return sum(p.stat().st_size for f in files for p in _input_files(f))


def content_fingerprint(files: Sequence[Path], memo_dir: Path | None = None) -> str:
    """sha256 over every input's name and bytes: the cache key of a prepared data set. With
    ``memo_dir``, remembered there (``INPUT_DIGESTS``) while the files are unchanged: a large
    corpus is read once, not at every start (see :mod:`bigtrain.data.digest_memo`)."""
    if memo_dir is not None:
        memo = DigestMemo(Path(memo_dir) / INPUT_DIGESTS)
        digest = memo.digest([p for f in files for p in _input_files(f)], lambda: content_fingerprint(files))
        memo.save()
        return digest
    h = hashlib.sha256()
    for f in files:
        for p in _input_files(f):
            h.update(str(p.relative_to(f.parent)).encode() + b"\0")
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            h.update(b"\0")
    return h.hexdigest()

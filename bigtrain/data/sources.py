"""Raw text sources: resolve ``data.path`` to files and iterate their documents.

A ``.txt`` file is one document; a ``.jsonl`` file holds one document per line, under a
configurable field. Torch-free.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence, Union

TEXT_SUFFIXES = (".txt", ".jsonl")


class DataError(ValueError):
    """Bad input data; ``str(err)`` is one line naming the file (and line) at fault."""


def _as_list(path: Union[str, Sequence[str]]) -> list[str]:
    return [path] if isinstance(path, str) else list(path)


def resolve_files(path: Union[str, Sequence[str]]) -> list[Path]:
    """Expand files, directories (recursively, .txt/.jsonl) and globs into a sorted file list."""
    files: list[Path] = []
    for entry in _as_list(path):
        entry = os.path.expanduser(entry)
        if any(ch in entry for ch in "*?["):
            matches = sorted(glob.glob(entry, recursive=True))
            if not matches:
                raise DataError(f"data.path: glob '{entry}' matches no files")
            files.extend(Path(m) for m in matches if Path(m).is_file())
        elif os.path.isdir(entry):
            found = sorted(p for p in Path(entry).rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not found:
                raise DataError(f"data.path: directory '{entry}' holds no .txt or .jsonl files")
            files.extend(found)
        elif os.path.isfile(entry):
            files.append(Path(entry))
        else:
            raise DataError(f"data.path: no such file or directory: '{entry}'")
    for f in files:
        if f.suffix not in TEXT_SUFFIXES:
            raise DataError(f"data.path: '{f}' is not a .txt or .jsonl file")
    return files


def iter_documents(files: Sequence[Path], jsonl_field: str = "text") -> Iterator[str]:
    """Yield documents in file order. Empty documents are skipped."""
    for f in files:
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8", errors="strict") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{f}:{lineno}: not valid JSON ({err.msg})") from None
                    if not isinstance(record, dict) or not isinstance(record.get(jsonl_field), str):
                        raise DataError(f"{f}:{lineno}: expected an object with a string field '{jsonl_field}'")
                    if record[jsonl_field]:
                        yield record[jsonl_field]
        else:
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{f}: not UTF-8 text (byte {err.start})") from None
            if text:
                yield text


def content_fingerprint(files: Sequence[Path]) -> str:
    """sha256 over every file's name and bytes: the cache key of a prepared data set."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()

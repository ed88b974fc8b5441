"""``bigtrain data prepare``: raw text -> a tokenizer (a trained SentencePiece model, or the one
at ``data.tokenizer.path``) + binary token shards.

The output directory is keyed by a content hash of the inputs and the tokenizer settings, so
preparing the same data twice is a no-op, and ``bigtrain train`` can prepare on first use.
Everything is written into a temporary directory that is renamed into place only when complete.
Torch-free.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np

from bigtrain.config import DataSection
from bigtrain.data import corpora
from bigtrain.data.cache import build_set, default_cache_dir, file_entry, key_digest
from bigtrain.data.errors import BadRecords, DataError
from bigtrain.data.shards import FORMAT, MANIFEST, PreparedData, is_prepared_dir, open_prepared, token_dtype
from bigtrain.data.sources import content_fingerprint, input_bytes, iter_documents, resolve_files
from bigtrain.data.tokenizer import open_tokenizer, train_tokenizer

VAL_BLOCK_TOKENS = 4096  # the token stream is cut into blocks; every k-th block is held out


def _settings_key(cfg: DataSection, tokenizer_sha: Optional[str]) -> dict[str, Any]:
    tok = cfg.tokenizer
    return {
        "format": FORMAT,
        "tokenizer": tokenizer_sha or {"type": tok.type, "model_type": tok.model_type,
                                       "vocab_size": tok.vocab_size, "sample_bytes": tok.sample_bytes},
        "text_field": cfg.text_field,
        "reader": cfg.reader,
        "on_bad_record": cfg.on_bad_record,
        "val_fraction": cfg.val_fraction,
        "shard_tokens": cfg.shard_tokens,
    }


def _is_val_block(index: int, fraction: float) -> bool:
    """Every k-th block (k = 1/fraction), starting in the middle of the first k: spread evenly."""
    k = max(2, round(1 / fraction))
    return index % k == k // 2


class _ShardWriter:
    """Appends tokens to ``<split>-NNNNN.bin`` files of at most ``shard_tokens`` tokens."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._fh = None
        self._count = 0

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._fh = open(self.root / name, "wb")
        self.shards.append({"file": name, "split": self.split, "tokens": 0})
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._fh is None or self._count >= self.shard_tokens:
                self._open_next()
            take = min(len(tokens), self.shard_tokens - self._count)
            tokens[:take].astype(self.dtype, copy=False).tofile(self._fh)
            self._count += take
            self.shards[-1]["tokens"] += take
            tokens = tokens[take:]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the empirical unigram distribution of ``tokens``: what a model that
    ignores context would achieve at best on them."""
    counts = np.bincount(tokens.astype(np.int64))
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())


def _batched(docs: Iterable[str], max_chars: int = 8_000_000) -> Iterable[list[str]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def prepare(cfg: DataSection, out_dir: Optional[str | Path] = None,
            log: Callable[[str], None] = print) -> PreparedData:
    """Prepare ``cfg.path`` (downloading ``cfg.download`` first if the path is missing).

    Returns the verified prepared data set. A ``cfg.path`` that already is a prepared directory is
    returned as is.
    """
    if cfg.path is None:
        raise DataError("data.path: not set (a file, directory or glob of .txt/.jsonl/.parquet/.tsv files)")
    if isinstance(cfg.path, str):
        if is_prepared_dir(Path(cfg.path)):
            data = open_prepared(cfg.path, verify="checksum")
            if cfg.tokenizer.path:
                _check_same_tokenizer(data, open_tokenizer(cfg.tokenizer.path).fingerprint, cfg.tokenizer.path)
            return data
        if cfg.download and not os.path.exists(cfg.path):
            log(f"data: downloading corpus '{cfg.download}' into {cfg.path}")
            corpora.download(cfg.download, cfg.path)
    files = resolve_files(cfg.path)

    tokenizer = open_tokenizer(cfg.tokenizer.path) if cfg.tokenizer.path else None
    key = {"inputs": content_fingerprint(files),
           **_settings_key(cfg, tokenizer.fingerprint if tokenizer else None)}
    root = Path(out_dir) if out_dir else Path(cfg.cache_dir or default_cache_dir()) / "data" / key_digest(key)
    if is_prepared_dir(root):
        log(f"data: using prepared data {root} (cached by content hash)")
        return open_prepared(root, verify="checksum")

    t0 = time.time()
    n_bytes = input_bytes(files)
    bad = BadRecords(skip=cfg.on_bad_record == "skip")

    def documents(counter: BadRecords = bad):
        return iter_documents(files, cfg.text_field, counter, cfg.reader)

    if n_bytes == 0 or not any(True for _ in documents(BadRecords(skip=bad.skip))):
        raise DataError(f"data.path: corpus '{cfg.path}' has no text ({len(files)} files, {n_bytes} bytes)")
    log(f"data: preparing {len(files)} files ({n_bytes / 1e6:.1f} MB) into {root}")

    def write(tmp: Path) -> dict[str, Any]:
        nonlocal tokenizer
        if tokenizer is None:
            try:
                tokenizer = train_tokenizer(documents(BadRecords(skip=bad.skip)), cfg.tokenizer.vocab_size,
                                            cfg.tokenizer.model_type, cfg.tokenizer.sample_bytes,
                                            threads=os.cpu_count() or 1)
            except RuntimeError as err:
                raise DataError(f"data.tokenizer: training failed on '{cfg.path}': {str(err).strip()}") from None
            log(f"data: trained {cfg.tokenizer.model_type} tokenizer, vocab {tokenizer.vocab_size} "
                f"({time.time() - t0:.1f}s)")
        tok_files = [{"file": p.name, **file_entry(p)}
                     for p in tokenizer.save_files(tmp)]
        dtype = token_dtype(tokenizer.vocab_size)
        writers = {s: _ShardWriter(tmp, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
        pending = np.empty(0, dtype=np.int64)
        block = 0
        n_docs = 0

        def flush(tokens: np.ndarray, final: bool) -> np.ndarray:
            nonlocal block
            while len(tokens) >= VAL_BLOCK_TOKENS or (final and len(tokens)):
                chunk, tokens = tokens[:VAL_BLOCK_TOKENS], tokens[VAL_BLOCK_TOKENS:]
                split = "val" if _is_val_block(block, cfg.val_fraction) else "train"
                writers[split].write(chunk)
                block += 1
            return tokens

        for batch in _batched(documents()):
            encoded = tokenizer.encode_batch(batch, threads=os.cpu_count() or 1)
            n_docs += len(encoded)
            eos = np.array([tokenizer.eos_id], dtype=np.int64)
            flat = np.concatenate([np.concatenate([np.asarray(ids, dtype=np.int64), eos]) for ids in encoded])
            pending = flush(np.concatenate([pending, flat]), final=False)
        flush(pending, final=True)
        for w in writers.values():
            w.close()
        if bad.count:
            log(f"data: {bad.summary()}")
        if not writers["val"].shards:
            raise DataError(f"data.path: corpus '{cfg.path}' is too small for a validation split "
                            f"(needs > {VAL_BLOCK_TOKENS} / (2 x data.val_fraction) tokens; add text or raise data.val_fraction)")

        shards = writers["train"].shards + writers["val"].shards
        for s in shards:
            path = tmp / s["file"]
            s.update(file_entry(path))
        val_tokens = np.concatenate([np.fromfile(tmp / s["file"], dtype=dtype) for s in writers["val"].shards])
        return {
            "format": FORMAT,
            "created_s": round(time.time(), 3),
            "tokenizer": {"type": tokenizer.kind, "file": tokenizer.main_file, "vocab_size": tokenizer.vocab_size,
                          "eos_id": tokenizer.eos_id, "sha256": tokenizer.fingerprint,
                          "bytes": (tmp / tokenizer.main_file).stat().st_size, "files": tok_files},
            "dtype": dtype.str,
            "documents": n_docs,
            "sources": [{"file": str(f), "bytes": input_bytes([f])} for f in files],
            "settings": key,
            "shards": shards,
            "stats": {
                "train_tokens": sum(s["tokens"] for s in writers["train"].shards),
                "val_tokens": int(len(val_tokens)),
                "val_unigram_entropy_nats": unigram_entropy(val_tokens),
                "bad_records_skipped": bad.count,
            },
        }

    build_set(root, write)
    data = open_prepared(root, verify="checksum")
    st = data.manifest["stats"]
    log(f"data: {st['train_tokens']:,} train / {st['val_tokens']:,} val tokens in {time.time() - t0:.1f}s -> {root}")
    return data


def _check_same_tokenizer(data: PreparedData, fingerprint: str, where: str) -> None:
    if data.manifest["tokenizer"]["sha256"] != fingerprint:
        raise DataError(f"{data.root / MANIFEST}: prepared with a different tokenizer than {where} "
                        f"(sha256 {data.manifest['tokenizer']['sha256'][:12]} vs {fingerprint[:12]})")


def prepare_sources(cfg: DataSection, log: Callable[[str], None] = print) -> list[PreparedData]:
    """Prepare every source of ``cfg`` (one, or a mixture). The first source's tokenizer (trained,
    or ``data.tokenizer.path``) is used for all others, so they share one vocabulary."""
    sections = cfg.source_sections()
    first = prepare(sections[0], log=log)
    prepared = [first]
    for section in sections[1:]:
        shared_tok = section.tokenizer.model_copy(update={"path": str(first.tokenizer_path)})
        data = prepare(section.model_copy(update={"tokenizer": shared_tok}), log=log)
        _check_same_tokenizer(data, first.manifest["tokenizer"]["sha256"], str(first.tokenizer_path))
        prepared.append(data)
    return prepared

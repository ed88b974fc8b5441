"""``bigtrain data prepare``: raw text -> a tokenizer (a trained SentencePiece model, or the one
at ``data.tokenizer.path``) + binary token shards.

The stages, each in its own module:

1. sources (:mod:`bigtrain.data.sources`): ``data.path`` resolved to input files (downloaded
   first when ``data.download`` names a corpus and the path is missing) and their content hash;
2. the tokenizer (:mod:`bigtrain.data.tokenizer`): ``data.tokenizer.path``, or one trained on
   a sample of the documents;
3. shard writing (:mod:`bigtrain.data.shard_writer`): the documents encoded into train/val shards;
4. the cache (:mod:`bigtrain.data.cache`): the set is built in a temporary directory that is
   renamed to ``<cache>/data/<hash of the inputs and settings>`` only when complete, so preparing
   the same data twice is a no-op, and ``bigtrain train`` can prepare on first use.

Each input is read at most twice: once for its content hash, and once for the documents, which
the tokenizer's sample and the encoding share (:class:`~bigtrain.data.sources.DocumentPass`).
Torch-free.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from bigtrain.config import DataSection
from bigtrain.data import corpora
from bigtrain.data.cache import build_set, default_cache_dir, file_entry, key_digest
from bigtrain.data.errors import BadRecords, DataError
from bigtrain.data.shard_writer import VAL_BLOCK_TOKENS, WrittenShards, unigram_entropy, write_shards
from bigtrain.data.shards import FORMAT, MANIFEST, PreparedData, is_prepared_dir, open_prepared, token_dtype
from bigtrain.data.sources import DocumentPass, content_fingerprint, input_bytes, iter_documents, resolve_files
from bigtrain.data.tokenizer import AnyTokenizer, Tokenizer, load_tokenizer, open_tokenizer, train_tokenizer

Log = Callable[[str], None]


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


@dataclass
class _Inputs:
    """A source's input files, and (read when first asked for) their content hash."""

    cfg: DataSection
    files: list[Path]

    @cached_property
    def fingerprint(self) -> str:
        return content_fingerprint(self.files)


@dataclass
class _Pending:
    """A source whose set is still to be built: where, under which key, and its one pass of documents."""

    inputs: _Inputs
    key: dict[str, Any]
    root: Path
    bad: BadRecords
    documents: DocumentPass


def _locate(cfg: DataSection, log: Log) -> PreparedData | _Inputs:
    """``cfg.path`` as a prepared directory (checked), or its inputs (downloaded first if need be)."""
    if cfg.path is None:
        raise DataError("data.path: not set (a file, directory or glob of .txt/.jsonl/.parquet/.tsv files)")
    if isinstance(cfg.path, str):
        if is_prepared_dir(Path(cfg.path)):
            return open_prepared(cfg.path, verify="checksum")
        if cfg.download and not os.path.exists(cfg.path):
            log(f"data: downloading corpus '{cfg.download}' into {cfg.path}")
            corpora.download(cfg.download, cfg.path)
    return _Inputs(cfg, resolve_files(cfg.path))


def _cached_or_pending(inputs: _Inputs, tokenizer_sha: Optional[str], out_dir: Optional[str | Path],
                       log: Log) -> PreparedData | _Pending:
    """The cached set of these inputs and settings, or what building it needs (the corpus checked
    to hold some text)."""
    cfg, files = inputs.cfg, inputs.files
    key = {"inputs": inputs.fingerprint, **_settings_key(cfg, tokenizer_sha)}
    root = Path(out_dir) if out_dir else Path(cfg.cache_dir or default_cache_dir()) / "data" / key_digest(key)
    if is_prepared_dir(root):
        log(f"data: using prepared data {root} (cached by content hash)")
        return open_prepared(root, verify="checksum")
    bad = BadRecords(skip=cfg.on_bad_record == "skip")
    documents = DocumentPass(iter_documents(files, cfg.text_field, bad, cfg.reader))
    n_bytes = input_bytes(files)
    if n_bytes == 0 or documents.first() is None:
        raise DataError(f"data.path: corpus '{cfg.path}' has no text ({len(files)} files, {n_bytes} bytes)")
    log(f"data: preparing {len(files)} files ({n_bytes / 1e6:.1f} MB) into {root}")
    return _Pending(inputs, key, root, bad, documents)


def _train(cfg: DataSection, documents: Iterable[str], where: str, log: Log) -> Tokenizer:
    """A tokenizer trained per ``data.tokenizer`` on (a prefix of) ``documents``."""
    t0, tok = time.time(), cfg.tokenizer
    try:
        tokenizer = train_tokenizer(documents, tok.vocab_size, tok.model_type, tok.sample_bytes,
                                    threads=os.cpu_count() or 1)
    except RuntimeError as err:
        raise DataError(f"data.tokenizer: training failed on '{where}': {str(err).strip()}") from None
    log(f"data: trained {tok.model_type} tokenizer, vocab {tokenizer.vocab_size} ({time.time() - t0:.1f}s)")
    return tokenizer


def _manifest(p: _Pending, tokenizer: AnyTokenizer, tok_files: list[dict[str, Any]], written: WrittenShards,
              main_bytes: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "created_s": round(time.time(), 3),
        "tokenizer": {"type": tokenizer.kind, "file": tokenizer.main_file, "vocab_size": tokenizer.vocab_size,
                      "eos_id": tokenizer.eos_id, "sha256": tokenizer.fingerprint, "bytes": main_bytes,
                      "files": tok_files},
        "dtype": token_dtype(tokenizer.vocab_size).str,
        "documents": written.documents,
        "sources": [{"file": str(f), "bytes": input_bytes([f])} for f in p.inputs.files],
        "settings": p.key,
        "shards": written.shards,
        "stats": {
            "train_tokens": written.tokens("train"),
            "val_tokens": written.tokens("val"),
            "val_unigram_entropy_nats": unigram_entropy(written.val_counts),
            "bad_records_skipped": p.bad.count,
        },
    }


def _build(p: _Pending, tokenizer: AnyTokenizer, log: Log, t0: float) -> PreparedData:
    """Encode the pending source's documents with ``tokenizer`` into its set (shards hashed as they
    are written, so the new set is opened with a size check only)."""
    cfg = p.inputs.cfg

    def write(tmp: Path) -> dict[str, Any]:
        tok_files = [{"file": f.name, **file_entry(f)} for f in tokenizer.save_files(tmp)]
        written = write_shards(p.documents, tokenizer, tmp, cfg.val_fraction, cfg.shard_tokens,
                               threads=os.cpu_count() or 1)
        if p.bad.count:
            log(f"data: {p.bad.summary()}")
        if not written.tokens("val"):
            raise DataError(f"data.path: corpus '{cfg.path}' is too small for a validation split "
                            f"(needs > {VAL_BLOCK_TOKENS} / (2 x data.val_fraction) tokens; add text or raise data.val_fraction)")
        return _manifest(p, tokenizer, tok_files, written, (tmp / tokenizer.main_file).stat().st_size)

    build_set(p.root, write)
    data = open_prepared(p.root, verify="size")
    st = data.manifest["stats"]
    log(f"data: {st['train_tokens']:,} train / {st['val_tokens']:,} val tokens in {time.time() - t0:.1f}s -> {p.root}")
    return data


def prepare(cfg: DataSection, out_dir: Optional[str | Path] = None, log: Log = print) -> PreparedData:
    """Prepare ``cfg.path`` (downloading ``cfg.download`` first if the path is missing).

    Returns the verified prepared data set. A ``cfg.path`` that already is a prepared directory is
    returned as is (checked against ``data.tokenizer.path`` when that is set).
    """
    return _prepare(cfg, None, "", out_dir, log)


def prepare_sources(cfg: DataSection, log: Log = print) -> list[PreparedData]:
    """Prepare every source of ``cfg`` (one, or a mixture), all with one tokenizer: ``data.tokenizer.path``,
    else the first source's (trained on its sample, or that of its prepared set)."""
    first, *others = cfg.source_sections()
    prepared = [_prepare(first, None, "", None, log)]
    if others:
        tokenizer, where = load_tokenizer(prepared[0].tokenizer_path), str(prepared[0].tokenizer_path)
        prepared += [_prepare(section, tokenizer, where, None, log) for section in others]
    return prepared


def _prepare(cfg: DataSection, tokenizer: Optional[AnyTokenizer], where: str, out_dir: Optional[str | Path],
             log: Log) -> PreparedData:
    """One source, encoded with ``tokenizer`` (from ``where``; default: ``data.tokenizer.path``,
    else one trained on the source)."""
    t0 = time.time()
    located = _locate(cfg, log)
    if tokenizer is None and cfg.tokenizer.path:
        tokenizer, where = open_tokenizer(cfg.tokenizer.path), str(cfg.tokenizer.path)
    if isinstance(located, PreparedData):
        if tokenizer is not None:
            _check_same_tokenizer(located, tokenizer.fingerprint, where)
        return located
    found = _cached_or_pending(located, tokenizer.fingerprint if tokenizer else None, out_dir, log)
    if isinstance(found, PreparedData):
        return found
    tokenizer = tokenizer or _train(cfg, found.documents.sample(), str(cfg.path), log)
    return _build(found, tokenizer, log, t0)


def _check_same_tokenizer(data: PreparedData, fingerprint: str, where: str) -> None:
    if data.manifest["tokenizer"]["sha256"] != fingerprint:
        raise DataError(f"{data.root / MANIFEST}: prepared with a different tokenizer than {where} "
                        f"(sha256 {data.manifest['tokenizer']['sha256'][:12]} vs {fingerprint[:12]})")

"""``bigtrain data prepare``: raw text -> a tokenizer (a trained SentencePiece model, or the one
at ``data.tokenizer.path``) + binary token shards.

The stages, each in its own module:

1. sources (:mod:`bigtrain.data.sources`): ``data.path`` resolved to input files (downloaded
   first when ``data.download`` names a corpus and the path is missing) and their content hash;
2. the tokenizer (:mod:`bigtrain.data.tokenizer`), chosen once for all sources of a mixture:
   ``data.tokenizer.path``, or one trained on a sample of the documents (of every source, by weight);
3. shard writing (:mod:`bigtrain.data.shard_writer`): each source's documents encoded into
   train/val shards with that tokenizer;
4. the cache (:mod:`bigtrain.data.cache`): each source's set is built in a temporary directory
   that is renamed to ``<cache>/data/<hash of the inputs and settings>`` only when complete, so
   preparing the same data twice is a no-op, and ``bigtrain train`` can prepare on first use.

Each input is read at most twice: once for its content hash, and once for the documents, which
the tokenizer's sample and the encoding share (:class:`~bigtrain.data.sources.DocumentPass`).
Torch-free.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from bigtrain.config import DataSection
from bigtrain.data import corpora
from bigtrain.data.cache import build_set, default_cache_dir, file_entry, key_digest
from bigtrain.data.errors import BadRecords, DataError
from bigtrain.data.shard_writer import (
    VAL_BLOCK_TOKENS,
    WrittenShards,
    unigram_entropy,
    write_shards,
)
from bigtrain.data.shards import (
    FORMAT,
    MANIFEST,
    PreparedData,
    is_prepared_dir,
    open_prepared,
    token_dtype,
)
from bigtrain.data.sources import (
    DocumentPass,
    content_fingerprint,
    input_bytes,
    iter_documents,
    resolve_files,
)
from bigtrain.data.tokenizer import (
    AnyTokenizer,
    Tokenizer,
    load_tokenizer,
    open_tokenizer,
    sample_lines,
    train_on_lines,
)

Log = Callable[[str], None]


def _settings_key(cfg: DataSection, tokenizer_key: str | dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "tokenizer": tokenizer_key,
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
        return content_fingerprint(self.files, memo_dir=self.cache_root)

    @property
    def cache_root(self) -> Path:
        """Where this source's prepared sets are cached (by content hash)."""
        return Path(self.cfg.cache_dir or default_cache_dir()) / "data"


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


def _cached_or_pending(inputs: _Inputs, tokenizer_key: str | dict[str, Any], out_dir: str | Path | None,
                       log: Log) -> PreparedData | _Pending:
    """The cached set of these inputs and settings, or what building it needs (the corpus checked
    to hold some text)."""
    cfg, files = inputs.cfg, inputs.files
    key = {"inputs": inputs.fingerprint, **_settings_key(cfg, tokenizer_key)}
    root = Path(out_dir) if out_dir else inputs.cache_root / key_digest(key)
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


def _fixed_tokenizer(cfg: DataSection, located: list[PreparedData | _Inputs]) -> AnyTokenizer | None:
    """The tokenizer the sources must use: ``data.tokenizer.path``, else that of the first source
    given as a prepared directory, else none yet (it will be trained). Every prepared directory
    among the sources is checked to use it."""
    if cfg.tokenizer.path:
        tokenizer, where = open_tokenizer(cfg.tokenizer.path), str(cfg.tokenizer.path)
    else:
        given = next((d for d in located if isinstance(d, PreparedData)), None)
        if given is None:
            return None
        tokenizer, where = load_tokenizer(given.tokenizer_path), str(given.tokenizer_path)
    for data in located:
        if isinstance(data, PreparedData):
            _check_same_tokenizer(data, tokenizer.fingerprint, where)
    return tokenizer


def _training_key(cfg: DataSection, sources: list[_Inputs], weights: list[float]) -> dict[str, Any]:
    """What a trained tokenizer depends on: ``data.tokenizer``, and for a mixture every source of
    its sample (a single source's sample is its own inputs, already in its key)."""
    tok = cfg.tokenizer
    key: dict[str, Any] = {"type": tok.type, "model_type": tok.model_type, "vocab_size": tok.vocab_size,
                           "sample_bytes": tok.sample_bytes}
    if len(sources) > 1:
        key["sample"] = [{"inputs": s.fingerprint, "text_field": s.cfg.text_field, "weight": w}
                         for s, w in zip(sources, weights)]
    return key


def _train(cfg: DataSection, pending: list[_Pending], weights: list[float], log: Log) -> Tokenizer:
    """A tokenizer trained per ``data.tokenizer`` on a sample of the sources: the first lines of each,
    ``data.tokenizer.sample_bytes`` in all, shared by weight. The documents drawn stay in each
    source's :class:`DocumentPass` for its encoding."""
    t0, tok = time.time(), cfg.tokenizer
    budgets = [int(tok.sample_bytes * w / sum(weights)) for w in weights]
    lines = itertools.chain.from_iterable(sample_lines(p.documents.sample(), budget)
                                          for p, budget in zip(pending, budgets))
    try:
        tokenizer = train_on_lines(lines, tok.vocab_size, tok.model_type, threads=os.cpu_count() or 1)
    except RuntimeError as err:
        where = ", ".join(str(p.inputs.cfg.path) for p in pending)
        raise DataError(f"data.tokenizer: training failed on '{where}': {str(err).strip()}") from None
    mixture = f" on a sample of {len(pending)} sources" if len(pending) > 1 else ""
    log(f"data: trained {tok.model_type} tokenizer{mixture}, vocab {tokenizer.vocab_size} ({time.time() - t0:.1f}s)")
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
                            f"(needs > {VAL_BLOCK_TOKENS} / (2 x data.val_fraction) tokens; add text or raise "
                            f"data.val_fraction)")
        return _manifest(p, tokenizer, tok_files, written, (tmp / tokenizer.main_file).stat().st_size)

    build_set(p.root, write)
    data = open_prepared(p.root, verify="size")
    st = data.manifest["stats"]
    log(f"data: {st['train_tokens']:,} train / {st['val_tokens']:,} val tokens in {time.time() - t0:.1f}s -> {p.root}")
    return data


def prepare(cfg: DataSection, out_dir: str | Path | None = None, log: Log = print) -> PreparedData:
    """Prepare ``cfg.path`` (downloading ``cfg.download`` first if the path is missing).

    Returns the verified prepared data set. A ``cfg.path`` that already is a prepared directory is
    returned as is (checked against ``data.tokenizer.path`` when that is set).
    """
    return _prepare_all([cfg], [1.0], out_dir, log)[0]


def prepare_sources(cfg: DataSection, log: Log = print) -> list[PreparedData]:
    """Prepare every source of ``cfg`` (one, or a mixture), all with one tokenizer, chosen once:
    ``data.tokenizer.path``; else that of a source given as a prepared directory; else one trained
    on a sample of the mixture (see :func:`_train`)."""
    return _prepare_all(cfg.source_sections(), cfg.weights, None, log)


def _prepare_all(sections: list[DataSection], weights: list[float], out_dir: str | Path | None,
                 log: Log) -> list[PreparedData]:
    """The stages, over all sources: locate them; choose the tokenizer (or, when it is to be
    trained, key the sets by what it depends on); take the cached sets; train the tokenizer if any
    set is missing and none of the cached ones has it; build the missing sets."""
    t0 = time.time()
    cfg = sections[0]  # the tokenizer and shard settings are the same in every section
    located = [_locate(section, log) for section in sections]
    tokenizer = _fixed_tokenizer(cfg, located)
    raw = [x for x in located if isinstance(x, _Inputs)]
    tokenizer_key = tokenizer.fingerprint if tokenizer else _training_key(cfg, raw, weights)
    found = [x if isinstance(x, PreparedData) else _cached_or_pending(x, tokenizer_key, out_dir, log)
             for x in located]
    pending = [x for x in found if isinstance(x, _Pending)]
    if pending and tokenizer is None:
        cached = next((d for d in found if isinstance(d, PreparedData)), None)  # keyed by the same training
        tokenizer = load_tokenizer(cached.tokenizer_path) if cached else _train(cfg, pending, weights, log)
    prepared = [_build(x, tokenizer, log, t0) if isinstance(x, _Pending) else x for x in found]
    for data in prepared[1:]:
        _check_same_tokenizer(data, prepared[0].manifest["tokenizer"]["sha256"], str(prepared[0].tokenizer_path))
    return prepared


def _check_same_tokenizer(data: PreparedData, fingerprint: str, where: str) -> None:
    if data.manifest["tokenizer"]["sha256"] != fingerprint:
        raise DataError(f"{data.root / MANIFEST}: prepared with a different tokenizer than {where} "
                        f"(sha256 {data.manifest['tokenizer']['sha256'][:12]} vs {fingerprint[:12]})")

"""Data preparation: tokenizer round trip, shards + manifest checksums, caching, bad input."""

import json
import os
import time

import numpy as np
import pytest

from bigtrain.config import DataSection
from bigtrain.data.errors import DataError
from bigtrain.data.prepare import prepare
from bigtrain.data.shards import open_prepared
from bigtrain.data.tokenizer import Tokenizer, train_tokenizer
from conftest import TEST_CONFIG, aged, count_opens, run_cli


def data_cfg(path, cache, **kw) -> DataSection:
    return DataSection(path=str(path), cache_dir=str(cache), val_fraction=0.05,
                       tokenizer={"vocab_size": 512, **kw.pop("tokenizer", {})}, **kw)


@pytest.fixture(scope="module")
def prepared(tiny_text, tmp_path_factory):
    return prepare(data_cfg(tiny_text, tmp_path_factory.mktemp("cache")), log=lambda _m: None)


def test_tokenizer_round_trips_real_text(tiny_text):
    text = tiny_text.read_text()
    tok = train_tokenizer([text], vocab_size=512)
    sample = text[:20000]
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert len(ids) < 0.6 * len(sample)  # it learnt merges, not just characters
    odd = "Tabs\tand  double  spaces,\n\nunicode: café — ☃ 日本\n"
    assert tok.decode(tok.encode(odd)) == odd  # byte fallback keeps unseen characters


def test_prepared_shards_decode_to_the_corpus(prepared, tiny_text):
    m = prepared.manifest
    assert m["tokenizer"]["vocab_size"] == 512
    assert m["dtype"] == "<u2"
    train = np.concatenate([np.asarray(a) for a in prepared.memmaps("train")])
    val = np.concatenate([np.asarray(a) for a in prepared.memmaps("val")])
    assert len(train) == m["stats"]["train_tokens"] and len(val) == m["stats"]["val_tokens"] > 0
    assert 0 < len(val) / (len(train) + len(val)) < 0.1
    tok = Tokenizer.load(prepared.tokenizer_path)
    text = tiny_text.read_text()
    # The train split holds contiguous runs of the corpus: its first 4096-token block decodes to its start.
    assert text.startswith(tok.decode(train[:2000].tolist()))
    assert tok.fingerprint == m["tokenizer"]["sha256"]
    # every shard's checksum in the manifest matches the file
    open_prepared(prepared.root, verify="checksum")
    # unigram entropy is a real number of nats for this vocab
    assert 3.0 < m["stats"]["val_unigram_entropy_nats"] < np.log(512)


def test_prepare_is_cached_by_content(prepared, tiny_text, tmp_path):
    logs = []
    again = prepare(data_cfg(tiny_text, prepared.root.parent.parent), log=logs.append)
    assert again.root == prepared.root
    assert any("cached" in line for line in logs)
    changed = tmp_path / "changed.txt"
    changed.write_text(tiny_text.read_text() + "\nA new line.\n")
    other = prepare(data_cfg(changed, prepared.root.parent.parent), log=lambda _m: None)
    assert other.root != prepared.root


def test_preparing_reads_each_input_at_most_twice(tiny_text, tmp_path, monkeypatch):
    """Once for the content hash, once for the documents (shared by the tokenizer's sample and the
    encoding); a cached set of an unchanged corpus costs no read: its hash is remembered."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(tiny_text.read_bytes())
    aged(corpus)
    opens = count_opens(monkeypatch, corpus)
    first = prepare(data_cfg(corpus, tmp_path / "cache"), log=lambda _m: None)
    assert opens[corpus] == 2, opens
    again = prepare(data_cfg(corpus, tmp_path / "cache"), log=lambda _m: None)
    assert again.root == first.root and opens[corpus] == 2, opens
    assert (tmp_path / "cache" / "data" / ".input-digests.json").is_file()


def test_a_corpus_changed_since_its_hash_was_remembered_is_hashed_again(tiny_text, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(tiny_text.read_bytes())
    aged(corpus)
    first = prepare(data_cfg(corpus, tmp_path / "cache"), log=lambda _m: None)
    # the same size, other bytes, a new modification time: a new set
    raw = bytearray(corpus.read_bytes())
    raw[10:15] = b"XXXXX"
    corpus.write_bytes(bytes(raw))
    os.utime(corpus, ns=(time.time_ns() - 1800 * 10**9,) * 2)
    second = prepare(data_cfg(corpus, tmp_path / "cache"), log=lambda _m: None)
    assert second.root != first.root
    # just modified (within the filesystem clock's tick of a rewrite): read every time, never remembered
    corpus.write_bytes(tiny_text.read_bytes())
    opens = count_opens(monkeypatch, corpus)
    third = prepare(data_cfg(corpus, tmp_path / "cache"), log=lambda _m: None)
    assert third.root == first.root and opens[corpus] == 1, opens  # the hash; the set was cached


def test_shards_checked_once_are_not_read_again_until_they_change(prepared, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared.root, copy)
    aged(*copy.iterdir())
    shard = copy / "train-00000.bin"
    open_prepared(copy, verify="checksum")
    opens = count_opens(monkeypatch, shard, copy / "tokenizer.model")
    open_prepared(copy, verify="checksum")
    assert opens == {shard: 0, copy / "tokenizer.model": 0}
    # a copy (new inodes), its modification times kept, is checked again
    again = tmp_path / "again"
    shutil.copytree(copy, again)
    count = count_opens(monkeypatch, again / "train-00000.bin")
    open_prepared(again, verify="checksum")
    assert count[again / "train-00000.bin"] == 1
    # a byte flipped in place: its modification time changed, so it is read, and caught
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    aged(shard)
    with pytest.raises(DataError, match=r"train-00000.bin: checksum mismatch"):
        open_prepared(copy, verify="checksum")


def test_a_document_pass_replays_the_sample_and_reads_on():
    from bigtrain.data.sources import DocumentPass

    drawn = []
    docs = DocumentPass(drawn.append(d) or d for d in ["a", "b", "c", "d"])
    assert docs.first() == "a"
    sample = docs.sample()
    assert [next(sample), next(sample)] == ["a", "b"]
    assert list(docs) == ["a", "b", "c", "d"] and drawn == ["a", "b", "c", "d"]  # each drawn once
    assert DocumentPass(iter([])).first() is None


def test_jsonl_and_directory_inputs(tmp_path, tiny_text):
    lines = tiny_text.read_text().split("\n\n")
    src = tmp_path / "corpus"
    src.mkdir()
    with open(src / "a.jsonl", "w") as fh:
        fh.writelines(json.dumps({"body": para}) + "\n" for para in lines)
    data = prepare(data_cfg(src, tmp_path / "cache", text_field="body"), log=lambda _m: None)
    assert data.manifest["documents"] == len([p for p in lines if p])


def test_corrupt_shard_is_detected(prepared, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared.root, copy)
    shard = copy / "train-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train-00000.bin: checksum mismatch"):
        open_prepared(copy, verify="checksum")
    shard.write_bytes(bytes(raw[:-10]))
    with pytest.raises(DataError, match=r"train-00000.bin: size .* manifest says .* \(truncated"):
        open_prepared(copy, verify="size")


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        prepare(data_cfg(bad, tmp_path / "cache"), log=lambda _m: None)


@pytest.mark.parametrize("name, expected", [
    ("missing.txt", "data.path: no such file or directory"),
    ("empty.txt", "has no text"),
    ("*.nothing", "matches no files"),
])
def test_cli_bad_data_fails_before_training(tmp_path, name, expected):
    path = tmp_path / name
    if name == "empty.txt":
        path.write_text("")
    run_dir = tmp_path / "run"
    proc = run_cli("train", str(TEST_CONFIG), f"data.path={path}", f"run.dir={run_dir}",
                   f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (run_dir / "metrics.jsonl").exists()


def test_cli_corrupt_prepared_data_fails_before_training(prepared, tmp_path):
    import shutil

    copy = tmp_path / "prepared"
    shutil.copytree(prepared.root, copy)
    shard = copy / "val-00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[0] ^= 0x01
    shard.write_bytes(bytes(raw))
    proc = run_cli("train", str(TEST_CONFIG), f"data.path={copy}", f"run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert f"{shard}: checksum mismatch" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("vocab, message", [
    (64, "data.tokenizer.vocab_size: 64 is too small for this text (it needs at least"),
    (100000, "data.tokenizer.vocab_size: 100000 is more pieces than this text holds (at most"),
])
def test_an_untrainable_vocabulary_size_is_a_one_line_error(tmp_path, vocab, message):
    corpus = tmp_path / "small.txt"
    corpus.write_text("the film was good, the play was bad\n" * 40)
    proc = run_cli("data", "prepare", f"data.path={corpus}", f"data.tokenizer.vocab_size={vocab}",
                   f"data.cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {message}") and len(proc.stderr.strip().splitlines()) == 1

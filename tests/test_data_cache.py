"""The one builder of prepared sets (token shards, record sets, image sets): complete or absent."""

import json

import pytest

from bigtrain.data.cache import build_set, key_digest


def write_one(text):
    def write(tmp):
        (tmp / "data.txt").write_text(text)
        return {"format": "test/1", "text": text}
    return write


def test_a_built_set_has_its_manifest_and_no_temporary_directory(tmp_path):
    out = tmp_path / "sets" / key_digest({"inputs": "abc"})
    manifest = build_set(out, write_one("a"))
    assert json.loads((out / "manifest.json").read_text()) == manifest == {"format": "test/1", "text": "a"}
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_an_existing_set_is_kept_unless_replaced(tmp_path):
    out = tmp_path / "set"
    build_set(out, write_one("first"))
    build_set(out, write_one("second"))  # another process built the same content-keyed set first
    assert (out / "data.txt").read_text() == "first"
    build_set(out, write_one("third"), replace=True)
    assert (out / "data.txt").read_text() == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    def fail(tmp):
        (tmp / "half.bin").write_bytes(b"\0" * 10)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_set(tmp_path / "set", fail)
    assert list(tmp_path.iterdir()) == []


def test_key_digest_ignores_key_order():
    assert key_digest({"a": 1, "b": [2, 3]}) == key_digest({"b": [2, 3], "a": 1}) != key_digest({"a": 1})
    assert len(key_digest({"a": 1})) == 16

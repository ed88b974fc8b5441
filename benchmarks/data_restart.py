"""What a (re)start spends checking its data: hashing the corpus (the prepared set's cache key) and
checking the prepared files' sha256, the first time and once the digests are remembered
(bigtrain/data/digest_memo.py). Prints JSON.

    python benchmarks/data_restart.py [--corpus-mb 512] [--shards-mb 512]

The files are written here first and so are read from the page cache: the first-time numbers are
sha256's speed on this CPU, a lower bound of a read from a cluster filesystem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bigtrain.data.digest_memo import FRESH_NS  # noqa: E402
from bigtrain.data.shards import check_files, sha256_file  # noqa: E402
from bigtrain.data.sources import content_fingerprint  # noqa: E402

CHUNK = 64 << 20


def write_file(path: Path, mb: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as fh:
        for _ in range(0, mb << 20, CHUNK):
            fh.write(rng.integers(0, 256, CHUNK, dtype=np.uint8).tobytes())


def age(*paths: Path) -> None:
    """Modified long enough ago for a digest to be remembered."""
    old = time.time_ns() - 10 * FRESH_NS
    for p in paths:
        os.utime(p, ns=(old, old))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus-mb", type=int, default=512)
    parser.add_argument("--shards-mb", type=int, default=512, help="in shards of 128 MB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        write_file(corpus, args.corpus_mb, seed=0)
        shards = tmp / "set"
        shards.mkdir()
        entries = []
        for i in range(max(1, args.shards_mb // 128)):
            path = shards / f"train-{i:05d}.bin"
            write_file(path, min(128, args.shards_mb), seed=1 + i)
            entries.append({"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        age(corpus, *(shards / e["file"] for e in entries))
        memo_dir = tmp / "cache"
        result = {
            "benchmark": "data_restart",
            "corpus_bytes": corpus.stat().st_size,
            "shard_bytes": sum(e["bytes"] for e in entries),
            "corpus_hash_first_s": timed(lambda: content_fingerprint([corpus], memo_dir=memo_dir)),
            "corpus_hash_remembered_s": timed(lambda: content_fingerprint([corpus], memo_dir=memo_dir)),
            "shards_check_first_s": timed(lambda: check_files(shards, entries, verify="checksum")),
            "shards_check_remembered_s": timed(lambda: check_files(shards, entries, verify="checksum")),
        }
    for what in ("corpus_hash", "shards_check"):
        first, again = result[f"{what}_first_s"], result[f"{what}_remembered_s"]
        result[f"{what}_first_over_remembered"] = round(first / again, 1)
        result[f"{what}_first_s"], result[f"{what}_remembered_s"] = round(first, 3), round(again, 5)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Streaming reader throughput and resume cost, printed as JSON.

1. Loader tokens/s (1 process, ``--workers`` dataloader workers, gpt-tiny's batch shape) next to
   the tokens/s the tiny GPT trains at on this machine, measured in the same run: the reader must
   be far faster than training consumes (``loader_over_training``).
2. Resume time at 10% vs 90% of a ``--tokens`` (default 50M) token shard set: build the reader,
   load a state at that position, get the first batch. A seek, so the two must be close
   (``resume_90_over_10``).

    python benchmarks/data.py [--tokens 50000000] [--workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bigtrain import train as bt_train
from bigtrain.config import load_config
from bigtrain.data.prepare import prepare
from bigtrain.data.shards import MANIFEST, open_prepared, sha256_file
from bigtrain.data.stream import CausalLMStream, StatefulLoader
from bigtrain.tracking.jsonl import read_jsonl


def training_tokens_per_s(cfg, steps: int, workdir: Path) -> float:
    run = cfg.model_copy(deep=True)
    run.run.dir = str(workdir / "train")
    run.train.max_steps, run.train.log_every, run.train.eval_every = steps, max(1, steps // 4), 0
    run.train.sample_tokens = 0
    run.checkpoint.save_final, run.checkpoint.resume = False, "never"
    run.tracking.console = "plain"
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the JSON result
        bt_train.train(run)
    records = read_jsonl(Path(run.run.dir) / "metrics.jsonl")[1:]  # the first interval includes warm-up
    return statistics.mean(r["tokens_per_s"] for r in records)


def loader_tokens_per_s(data, cfg, workers: int, micro_batches: int) -> float:
    stream = CausalLMStream([data], cfg.train.seq_len, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                            seed=cfg.seed)
    loader = StatefulLoader(stream, num_workers=workers)
    loader.next()  # workers started
    t0 = time.perf_counter()
    for _ in range(micro_batches):
        batch = loader.next()
    elapsed = time.perf_counter() - t0
    loader.close()
    return micro_batches * batch["input_ids"].numel() / elapsed


def tile_shards(src, dest: Path, tokens: int, shard_tokens: int) -> None:
    """A prepared set of ``tokens`` tokens: ``src``'s train tokens repeated, in shards."""
    dest.mkdir(parents=True)
    shutil.copy(src.tokenizer_path, dest / "tokenizer.model")
    base = np.concatenate([np.asarray(m) for m in src.memmaps("train")])
    manifest = json.loads((src.root / MANIFEST).read_text())
    shards, written = [], 0
    while written < tokens:
        n = min(shard_tokens, tokens - written)
        name = f"train-{len(shards):05d}.bin"
        reps = -(-n // len(base))
        np.tile(base, reps)[:n].astype(src.dtype).tofile(dest / name)
        shards.append({"file": name, "split": "train", "tokens": n, "bytes": (dest / name).stat().st_size,
                       "sha256": sha256_file(dest / name)})
        written += n
    for s in manifest["shards"]:
        if s["split"] == "val":
            shutil.copy(src.root / s["file"], dest / s["file"])
            shards.append(s)
    manifest["shards"] = shards
    manifest["stats"]["train_tokens"] = tokens
    manifest["settings"]["shard_tokens"] = shard_tokens
    (dest / MANIFEST).write_text(json.dumps(manifest))


def resume_seconds(data, cfg, fraction: float, workers: int, repeats: int = 5) -> float:
    times = []
    for r in range(repeats):
        stream = CausalLMStream([data], cfg.train.seq_len, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                seed=cfg.seed)
        position = int(stream.num_samples * fraction) // cfg.train.global_batch_size * cfg.train.global_batch_size
        state = stream.state_dict()
        state["position"] = position + r * cfg.train.global_batch_size
        t0 = time.perf_counter()
        loader = StatefulLoader(stream, num_workers=workers)
        loader.load_state_dict(state)
        batch = loader.next()
        times.append(time.perf_counter() - t0)
        assert int(batch["position"][0]) == state["position"]
        loader.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=50_000_000)
    parser.add_argument("--shard-tokens", type=int, default=10_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=3000)
    parser.add_argument("--train-steps", type=int, default=16)
    args = parser.parse_args()
    cfg = load_config(ROOT / "configs" / "gpt-tiny.yaml", [])
    data = prepare(cfg.data, log=lambda m: print(m, file=sys.stderr))
    with tempfile.TemporaryDirectory() as tmp:
        train_tps = training_tokens_per_s(cfg, args.train_steps, Path(tmp))
        loader_tps = loader_tokens_per_s(data, cfg, args.workers, args.micro_batches)
        big_root = Path(tmp) / "big"
        tile_shards(data, big_root, args.tokens, args.shard_tokens)
        big = open_prepared(big_root, verify="size")
        resume = {f: resume_seconds(big, cfg, f, args.workers) for f in (0.1, 0.9)}
        resume_inline = {f: resume_seconds(big, cfg, f, 0) for f in (0.1, 0.9)}
    print(json.dumps({
        "benchmark": "data",
        "batch": {"micro_batch": cfg.train.micro_batch_size, "seq_len": cfg.train.seq_len},
        "loader_workers": args.workers,
        "loader_tokens_per_s": round(loader_tps),
        "training_tokens_per_s": round(train_tps, 1),
        "loader_over_training": round(loader_tps / train_tps, 1),
        "resume_set_tokens": args.tokens, "resume_set_shards": -(-args.tokens // args.shard_tokens),
        "resume_s_at_10pct": round(resume[0.1], 4), "resume_s_at_90pct": round(resume[0.9], 4),
        "resume_90_over_10": round(resume[0.9] / resume[0.1], 3),
        "resume_s_no_workers_at_10pct": round(resume_inline[0.1], 5),
        "resume_s_no_workers_at_90pct": round(resume_inline[0.9], 5),
    }, indent=2))


if __name__ == "__main__":
    main()

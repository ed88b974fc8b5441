"""Checkpoint cost through bigtrain's own CheckpointManager, printed as JSON.

For the tiny GPT (configs/gpt-tiny.yaml) and an 88M-parameter GPT-2 (12 layers, d768, vocab 4096),
strategy ``single`` on one process and ``fsdp`` on 2 ranks (torchrun, gloo), after one optimizer
step so Adam state exists:

- ``sync_save_s``: ``save`` until the checkpoint is committed;
- ``async_stall_s``: how long ``save(asynchronous=True)`` blocks the training loop, next to
  ``async_total_s``, until that checkpoint is committed in the background;
- ``load_s``: restore model, optimizer and RNG from a committed checkpoint;
- ``bytes``: what one checkpoint holds on disk (all ranks' files).

    python benchmarks/checkpoint.py [--repeats 3] [--nproc 2]   # --nproc 0: single only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bigtrain import dist
from bigtrain.checkpoint import CheckpointManager
from bigtrain.config import load_config
from bigtrain.models import build_causal_lm
from bigtrain.strategies import build_strategy

MODELS = {
    "gpt-tiny": [],
    "gpt2-88m": ["model.n_layer=12", "model.n_head=12", "model.d_model=768"],
}


def measure(name: str, overrides: list[str], strategy_name: str, repeats: int, info, workdir: Path) -> dict:
    """Collective when ``info.world_size > 1``; the numbers are rank 0's."""
    cfg = load_config(ROOT / "configs" / "gpt-tiny.yaml", ["train.seq_len=64",
                                                           f"train.global_batch_size={2 * info.world_size}",
                                                           "train.micro_batch_size=2", f"strategy.name={strategy_name}",
                                                           *overrides])
    vocab = cfg.data.tokenizer.vocab_size
    torch.manual_seed(0)
    model = build_causal_lm(cfg.model, vocab, cfg.train.seq_len)
    params = sum(p.numel() for p in model.parameters())
    strategy = build_strategy(cfg, info)
    strategy.setup(model)
    x = torch.randint(0, vocab, (2, cfg.train.seq_len))
    strategy.forward_backward({"input_ids": x, "labels": x}, scale=1.0, last_micro=True)
    strategy.step(1e-4)
    results: dict[str, list[float]] = {"sync_save_s": [], "async_stall_s": [], "async_total_s": [], "load_s": []}
    size = 0
    for r in range(repeats):
        mgr = CheckpointManager(workdir / f"{name}-{r}", cfg.checkpoint, info, log=lambda _m: None)
        dist.barrier()
        t0 = time.perf_counter()
        mgr.save(1, strategy, {"step": 1}, cfg.to_yaml(), asynchronous=False)
        results["sync_save_s"].append(time.perf_counter() - t0)
        path = mgr.root / "step-1"
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        dist.barrier()
        t0 = time.perf_counter()
        mgr.save(2, strategy, {"step": 2}, cfg.to_yaml(), asynchronous=True)
        results["async_stall_s"].append(time.perf_counter() - t0)
        mgr.wait()  # the rest of the write, and the commit
        results["async_total_s"].append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        mgr.load(path, strategy, cfg.model.model_dump(mode="json"))
        results["load_s"].append(time.perf_counter() - t0)
    strategy.close()
    out = {"model": name, "strategy": strategy_name, "ranks": info.world_size, "params": params, "bytes": size}
    out.update({k: round(statistics.median(v), 4) for k, v in results.items()})
    out["async_stall_over_sync"] = round(out["async_stall_s"] / out["sync_save_s"], 3)
    return out


def run_ranks(nproc: int, repeats: int, workdir: Path) -> list[dict]:
    """The FSDP rows: this script again under torchrun, rank 0 writes them to a file."""
    out = workdir / "fsdp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           __file__, "--worker", "fsdp", "--repeats", str(repeats), "--workdir", str(workdir / "fsdp"), "--out",
           str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        return [{"strategy": "fsdp", "ranks": nproc, "error": proc.stderr.strip().splitlines()[-3:]}]
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2, help="ranks for fsdp (0: skip it)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one rank of run_ranks
        info = dist.init(always=True)
        rows = [measure(name, ov, args.worker, args.repeats, info, Path(args.workdir)) for name, ov in MODELS.items()]
        if info.is_main:
            Path(args.out).write_text(json.dumps(rows))
        dist.shutdown()
        return
    info = dist.init()
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, ov, "single", args.repeats, info, Path(tmp)) for name, ov in MODELS.items()]
        if args.nproc > 1:
            rows += run_ranks(args.nproc, args.repeats, Path(tmp))
    print(json.dumps({"benchmark": "checkpoint", "repeats": args.repeats, "threads_single": threads,
                      "note": "fsdp ranks run one thread each; compare ratios within a row, not absolutes",
                      "results": rows}, indent=2))


if __name__ == "__main__":
    main()

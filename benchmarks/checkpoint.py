"""Checkpoint cost through bigtrain's own CheckpointManager, printed as JSON.

For the tiny GPT (configs/gpt-tiny.yaml) and an 88M-parameter GPT-2 (12 layers, d768, vocab 4096),
one process, strategy ``single`` (after one optimizer step, so Adam state exists):

- ``sync_save_s``: ``save`` until the checkpoint is committed;
- ``async_stall_s``: how long ``save(asynchronous=True)`` blocks the training loop, next to
  ``async_total_s``, until that checkpoint is committed in the background;
- ``load_s``: restore model, optimizer and RNG from a committed checkpoint;
- ``bytes``: what one checkpoint holds on disk.

    python benchmarks/checkpoint.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bigtrain import dist  # noqa: E402
from bigtrain.checkpoint import CheckpointManager  # noqa: E402
from bigtrain.config import load_config  # noqa: E402
from bigtrain.models import build_causal_lm  # noqa: E402
from bigtrain.strategies import build_strategy  # noqa: E402

MODELS = {
    "gpt-tiny": [],
    "gpt2-88m": ["model.n_layer=12", "model.n_head=12", "model.d_model=768"],
}


def measure(name: str, overrides: list[str], repeats: int, info, workdir: Path) -> dict:
    cfg = load_config(ROOT / "configs" / "gpt-tiny.yaml", ["train.seq_len=64", "train.global_batch_size=2",
                                                           "train.micro_batch_size=2", *overrides])
    vocab = cfg.data.tokenizer.vocab_size
    torch.manual_seed(0)
    model = build_causal_lm(cfg.model, vocab, cfg.train.seq_len)
    params = sum(p.numel() for p in model.parameters())
    strategy = build_strategy(cfg, info)
    strategy.setup(model)
    x = torch.randint(0, vocab, (2, cfg.train.seq_len))
    strategy.forward_backward(x, x, scale=1.0, last_micro=True)
    strategy.step(1e-4)
    results: dict[str, list[float]] = {"sync_save_s": [], "async_stall_s": [], "async_total_s": [], "load_s": []}
    size = 0
    for r in range(repeats):
        mgr = CheckpointManager(workdir / f"{name}-{r}", cfg.checkpoint, info, log=lambda _m: None)
        t0 = time.perf_counter()
        mgr.save(1, strategy, {"step": 1}, cfg.to_yaml(), asynchronous=False)
        results["sync_save_s"].append(time.perf_counter() - t0)
        path = mgr.last_committed
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        t0 = time.perf_counter()
        mgr.save(2, strategy, {"step": 2}, cfg.to_yaml(), asynchronous=True)
        results["async_stall_s"].append(time.perf_counter() - t0)
        while mgr.last_committed is None or mgr.last_committed.name != "step-2":
            mgr.poll()
            time.sleep(0.001)
        results["async_total_s"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mgr.load(path, strategy, cfg.model.model_dump(mode="json"))
        results["load_s"].append(time.perf_counter() - t0)
    out = {"model": name, "params": params, "bytes": size}
    out.update({k: round(statistics.median(v), 4) for k, v in results.items()})
    out["async_stall_over_sync"] = round(out["async_stall_s"] / out["sync_save_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    info = dist.init()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, ov, args.repeats, info, Path(tmp)) for name, ov in MODELS.items()]
    print(json.dumps({"benchmark": "checkpoint", "strategy": "single", "repeats": args.repeats,
                      "threads": torch.get_num_threads(), "results": rows}, indent=2))


if __name__ == "__main__":
    main()

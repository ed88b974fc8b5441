"""bigtrain's training loop vs a plain PyTorch loop on the same model, data and settings.

Runs them alternately (bigtrain, plain, bigtrain, plain, ...) in one process and prints JSON
with the tokens/s of each and their ratio. Usage:

    python benchmarks/loop_overhead.py [--rounds 3] [--steps 30] [key=value ...]

Extra ``key=value`` arguments override ``configs/gpt-tiny.yaml`` (e.g. precision=fp32).
Needs the Shakespeare corpus prepared once (``make train`` does it) or ``data.path=...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bigtrain import train as bt_train
from bigtrain.config import load_config
from bigtrain.data.prepare import prepare
from bigtrain.data.stream import CausalLMStream
from bigtrain.models import build_causal_lm
from bigtrain.tracking.jsonl import read_jsonl


def bigtrain_tokens_per_s(cfg, steps: int, workdir: Path) -> float:
    run = cfg.model_copy(deep=True)
    run.run.dir = str(workdir / f"bt-{time.monotonic_ns()}")
    run.train.max_steps = steps
    run.train.log_every = steps // 3
    run.train.eval_every = 0
    run.train.eval_batches = 1
    run.train.sample_tokens = 0
    run.checkpoint.save_final = False
    run.checkpoint.resume = "never"
    run.tracking.console = "plain"
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON result
        bt_train.train(run)
    records = read_jsonl(Path(run.run.dir) / "metrics.jsonl")[1:]  # first interval includes warm-up
    return statistics.mean(r["tokens_per_s"] for r in records)


def plain_tokens_per_s(cfg, data, steps: int) -> float:
    torch.manual_seed(cfg.seed)
    model = build_causal_lm(cfg.model, data.vocab_size, cfg.train.seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=True)
    stream = iter(CausalLMStream([data], cfg.train.seq_len, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                 seed=cfg.seed))
    dtype = torch.bfloat16 if cfg.precision == "bf16" else None
    accum = cfg.train.global_batch_size // cfg.train.micro_batch_size
    warm = steps // 3
    for step in range(steps):
        if step == warm:
            t0 = time.perf_counter()
        for micro in range(accum):
            batch = next(stream)
            x, y = batch["input_ids"], batch["labels"]
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                logits = model(input_ids=x).logits
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1)) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    return (steps - warm) * cfg.train.global_batch_size * cfg.train.seq_len / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(ROOT / "configs" / "gpt-tiny.yaml", args.overrides)
    data = prepare(cfg.data, log=lambda _m: None)
    ours, plain = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            ours.append(bigtrain_tokens_per_s(cfg, args.steps, Path(tmp)))
            plain.append(plain_tokens_per_s(cfg, data, args.steps))
    result = {
        "benchmark": "loop_overhead",
        "model": f"{cfg.model.name} {cfg.model.n_layer}L d{cfg.model.d_model} vocab {data.vocab_size}",
        "precision": cfg.precision, "seq_len": cfg.train.seq_len, "global_batch": cfg.train.global_batch_size,
        "threads": torch.get_num_threads(), "rounds": args.rounds, "steps_per_round": args.steps,
        "bigtrain_tokens_per_s": [round(v, 1) for v in ours],
        "plain_tokens_per_s": [round(v, 1) for v in plain],
        "ratio_bigtrain_over_plain": round(statistics.median(ours) / statistics.median(plain), 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

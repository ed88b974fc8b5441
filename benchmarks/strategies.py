"""Tokens/s and per-rank memory of every engine at 2 ranks on the tiny GPT, measured in one run.

    python benchmarks/strategies.py [--steps 20] [--nproc 2] [key=value ...]

Each engine trains configs/gpt-tiny.yaml through the real CLI (torchrun, gloo on CPU); the
numbers come from its metrics.jsonl (the first logged interval, which includes warm-up, is
dropped). Prints JSON. Needs the Shakespeare corpus (``make train`` prepares it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {
    "single": (1, ["strategy.name=single"]),
    "ddp": (None, ["strategy.name=ddp"]),
    "fsdp": (None, ["strategy.name=fsdp"]),
    "zero1": (None, ["strategy.name=deepspeed", "strategy.deepspeed.stage=1"]),
    "zero2": (None, ["strategy.name=deepspeed", "strategy.deepspeed.stage=2"]),
    "zero3": (None, ["strategy.name=deepspeed", "strategy.deepspeed.stage=3"]),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (nproc, extra) in ENGINES.items():
            run_dir = Path(tmp) / name
            cmd = [sys.executable, "-m", "launcher.cli", "train", "configs/gpt-tiny.yaml", "--nproc",
                   str(nproc or args.nproc), f"run.dir={run_dir}", f"train.max_steps={args.steps}",
                   f"train.log_every={max(1, args.steps // 4)}", "train.eval_every=0", "train.eval_batches=1",
                   "train.sample_tokens=0", "checkpoint.save_final=false", "checkpoint.resume=never",
                   *extra, *args.overrides]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode:
                results[name] = {"error": proc.stderr.strip().splitlines()[-1:]}
                continue
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
            last = records[-1]
            results[name] = {
                "ranks": nproc or args.nproc,
                "tokens_per_s": round(statistics.mean(r["tokens_per_s"] for r in records), 1),
                "memory_per_rank_bytes": {k[4:]: v for k, v in last.items() if k.startswith("mem_")},
            }
    ddp = results.get("ddp", {}).get("tokens_per_s")
    for name, res in results.items():
        if ddp and "tokens_per_s" in res:
            res["tokens_per_s_vs_ddp"] = round(res["tokens_per_s"] / ddp, 3)
    print(json.dumps({"benchmark": "strategies", "config": "configs/gpt-tiny.yaml", "steps": args.steps,
                      "note": "2 ranks on 2 CPU cores are for correctness; compare ratios, not absolutes",
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""Peak RSS per rank when FSDP or ZeRO-3 fine-tunes a large pretrained checkpoint: read on rank 0
alone (FSDP: the other ranks build the model on the meta device and receive their shards; ZeRO-3:
every rank builds it partitioned under zero.Init and rank 0 reads the values into the partitions)
or on every rank.

    python benchmarks/pretrained_memory.py [--layers 24] [--d-model 1024] [--text FILE] [--only WORD,...]

Writes a GPT-2 (default 24 layers, d=1024, a 400-token BPE vocabulary: ~302M parameters, 1.2 GB of
fp32) with ``save_pretrained`` (``tests/hf_checkpoints.py``'s writer), then runs it through the real
CLI: 1 process, and 2 ranks with
``strategy.fsdp.pretrained_from`` and ``strategy.deepspeed.pretrained_from`` rank0 and every_rank,
each twice: "setup" stops at the start of
step 1 (``BIGTRAIN_FAULT=loop-error@1``: loading, sharding, the optimizer built) and "1 step" trains
one AdamW step (gradients and Adam moments then dominate). Each rank's peak RSS is its VmHWM, read
from /proc while it runs. Prints JSON (GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
ZERO3 = ["strategy.name=deepspeed", "strategy.deepspeed.stage=3"]


def write_checkpoint(out: Path, text: str, layers: int, d_model: int) -> int:
    """The tests' GPT-2 checkpoint writer (a 400-token BPE tokenizer), at this size; its parameter count."""
    sys.path.insert(0, str(ROOT / "tests"))
    from transformers import GPT2LMHeadModel

    from hf_checkpoints import hf_checkpoint

    hf_checkpoint(out, text, n_layer=layers, n_embd=d_model)
    return sum(p.numel() for p in GPT2LMHeadModel.from_pretrained(out).parameters())


def peak_rss_per_rank(cmd: list[str], env: dict, fails: bool = False) -> tuple[dict[int, float], str]:
    """Run ``cmd`` (``fails``: it is meant to exit non-zero); the VmHWM (GiB) of every process running
    ``bigtrain.train``, by its RANK."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, float] = {}
    launcher = psutil.Process(proc.pid)
    while proc.poll() is None:
        for child in [launcher, *launcher.children(recursive=True)]:  # 1 process: the launcher execs it
            try:
                if "bigtrain.train" not in " ".join(child.cmdline()):
                    continue
                rank = int(child.environ().get("RANK", 0))
                hwm = next(int(line.split()[1]) for line in open(f"/proc/{child.pid}/status")
                           if line.startswith("VmHWM"))
                peaks[rank] = max(peaks.get(rank, 0.0), hwm * 1024 / 2**30)
            except (psutil.Error, OSError, StopIteration):
                pass
        time.sleep(0.1)
    out = proc.stdout.read()
    if bool(proc.returncode) != fails:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return {r: round(v, 2) for r, v in sorted(peaks.items())}, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="a text corpus (default: ../shared/data)")
    parser.add_argument("--only", help="runs whose names hold one of these comma-separated words, e.g. zero3")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = write_checkpoint(tmp / "hf", args.text.read_text()[:200_000], args.layers, args.d_model)
        common = ["train", "tests/configs/gpt-test.yaml", f"data.path={args.text}", f"data.cache_dir={tmp / 'cache'}",
                  f"model.pretrained={tmp / 'hf'}", "train.max_steps=1", "train.eval_every=0", "train.sample_tokens=0",
                  "train.global_batch_size=2", "train.micro_batch_size=1", "checkpoint.save_final=false"]
        runs = {"1 process": ["strategy.name=single"],
                "fsdp 2 ranks, every_rank": ["--nproc", "2", "strategy.name=fsdp",
                                             "strategy.fsdp.pretrained_from=every_rank"],
                "fsdp 2 ranks, rank0": ["--nproc", "2", "strategy.name=fsdp"],
                "zero3 2 ranks, every_rank": ["--nproc", "2", *ZERO3],
                "zero3 2 ranks, rank0": ["--nproc", "2", *ZERO3, "strategy.deepspeed.pretrained_from=rank0"]}
        if args.only:
            runs = {name: extra for name, extra in runs.items() if any(k in name for k in args.only.split(","))}
        for name, extra in runs.items():
            for phase, phase_env in (("setup", {"BIGTRAIN_FAULT": "loop-error@1"}), ("1 step", {})):
                run_dir = tmp / f"{name}-{phase}".replace(" ", "_").replace(",", "")
                cmd = [sys.executable, "-m", "launcher.cli", *common, f"run.dir={run_dir}", *extra]
                results.setdefault(name, {})[phase], _ = peak_rss_per_rank(cmd, {**env, **phase_env},
                                                                           fails=phase == "setup")
                print(name, phase, results[name][phase], file=sys.stderr)
    print(json.dumps({"benchmark": "pretrained_memory", "params": params,
                      "fp32_model_gib": round(params * 4 / 2**30, 2), "peak_rss_gib_per_rank": results}, indent=2))


if __name__ == "__main__":
    main()

"""Images/s of the ResNet presets through bigtrain beside a plain PyTorch loop on the same model.

    python benchmarks/cnn.py [--engines single,ddp,fsdp] [--nproc 2] [--steps 12] [--rounds 1] [--only resnet18@32]
                             [--channels-last]

For ResNet-18 and ResNet-50 at 32 px (the CIFAR stem) and 224 px (the ImageNet stem), on synthetic
3-channel images, fp32, SGD with momentum:

- **single vs plain, step by step.** bigtrain's real loop (``Trainer.fit``, strategy ``single``) and
  a plain loop (the same model, ImageStream batches, torch SGD) run in one process, a step of each
  in turn: the plain step runs when bigtrain's loop enters the next step's data phase, so each
  bigtrain step is timed from the end of the plain step to the next one. On a shared VM the speed
  of the machine drifts by 10-25% over a minute; taken in turn, both sides see the same machine
  (separate processes one after the other gave single / plain from 0.83 to 1.03 for one case).
- **ddp, fsdp**: ``--nproc`` ranks of one thread each through the real CLI, per-step times from
  metrics.jsonl (logged every step).

Every figure is images/s over the median step time after the first third of the steps (warm-up),
as ``peers.py`` counts. ``--rounds N`` repeats it all N times and reports medians (and each round's
ratio). ``--channels-last``: NHWC images and weights on both sides (``model.channels_last``).
Prints JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bigtrain.config import ModelSection, load_config
from bigtrain.data.images import ImageStream, write_synthetic
from bigtrain.models.resnet import build_resnet
from bigtrain.train import Trainer

# name@px -> global batch (the same for every engine: 2 ranks take half each)
CASES = {"resnet18@32": 64, "resnet50@32": 32, "resnet18@224": 16, "resnet50@224": 8}
TRAIN = ["optim.lr=0.01", "optim.weight_decay=0", "schedule.warmup_steps=0", "schedule.decay=constant",
         "train.grad_clip=0", "precision=fp32"]  # on configs/resnet50-synthetic.yaml (sgd, momentum 0.9)


def bigtrain_overrides(preset: str, data: Path, batch: int, steps: int, engine: str, ranks: int, run_dir: Path,
                       channels_last: bool) -> list[str]:
    """``configs/resnet50-synthetic.yaml`` as this benchmark runs it."""
    return [f"run.dir={run_dir}", f"data.path={data}", "data.download=null", f"model.preset={preset}",
            f"train.max_steps={steps}", f"train.global_batch_size={batch}", f"train.micro_batch_size={batch // ranks}",
            "train.log_every=1", "train.eval_every=0", "train.eval_batches=1", "checkpoint.save_final=false",
            "checkpoint.resume=never", "tracking.console=plain", *TRAIN, f"strategy.name={engine}",
            f"model.channels_last={str(channels_last).lower()}"]


def engine_images_per_s(preset: str, data: Path, batch: int, steps: int, engine: str, nproc: int,
                        workdir: Path, channels_last: bool = False) -> float | str:
    """bigtrain under ``engine`` at ``nproc`` ranks through the CLI, from its metrics.jsonl."""
    run_dir = workdir / f"{preset}-{data.name}-{engine}"
    cmd = [sys.executable, "-m", "launcher.cli", "train", "configs/resnet50-synthetic.yaml", "--nproc", str(nproc),
           *bigtrain_overrides(preset, data, batch, steps, engine, nproc, run_dir, channels_last)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        return "error: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return images_per_s([batch / r["samples_per_s"] for r in records], batch)


def images_per_s(step_s: list[float], batch: int) -> float:
    """Images per second over the median step time after the first third of the steps (warm-up)."""
    return round(batch / statistics.median(step_s[max(1, len(step_s) // 3):]), 2)


class PlainLoop:
    """What a user writes by hand: forward, cross-entropy, backward, SGD step, on ImageStream batches."""

    def __init__(self, preset: str, data: Path, batch: int, channels_last: bool = False):
        self.stream = ImageStream(data / "train", batch, batch, seed=0)
        _, channels, px, _ = self.stream.manifest["shape"]
        torch.manual_seed(0)
        self.model = build_resnet(ModelSection(name="resnet", preset=preset), channels,
                                  self.stream.manifest["num_classes"], px)
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(memory_format=self.layout)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.steps = 0

    def step(self) -> float:
        """One training step; returns its seconds."""
        began = time.perf_counter()
        b = self.stream.micro_batch_at(self.steps)
        images = b["images"].contiguous(memory_format=self.layout)
        loss = F.cross_entropy(self.model(pixel_values=images).logits, b["labels"])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()
        self.steps += 1
        return time.perf_counter() - began


def single_and_plain_in_turn(preset: str, data: Path, batch: int, steps: int, workdir: Path,
                             channels_last: bool = False) -> tuple[float, float, PlainLoop]:
    """(bigtrain single images/s, plain images/s, the plain loop), a step of each in turn in this process."""
    run_dir = workdir / f"{preset}-{data.name}-in-turn-{time.monotonic_ns()}"
    cfg = load_config(ROOT / "configs" / "resnet50-synthetic.yaml", bigtrain_overrides(
        preset, data, batch, steps, "single", 1, run_dir, channels_last))
    trainer = Trainer(cfg)
    plain = PlainLoop(preset, data, batch, channels_last)
    ours_s, plain_s, began = [], [], {}

    def enter(phase, step=None, _enter=None):
        if phase == "data" and step is not None and step not in began:
            if began:  # bigtrain's previous step ends here
                ours_s.append(time.perf_counter() - began[step - 1])
            plain_s.append(plain.step())
            began[step] = time.perf_counter()
        _enter(phase, step)

    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON result
        try:
            trainer.setup()
            trainer.heartbeat.enter = functools.partial(enter, _enter=trainer.heartbeat.enter)
            trainer.fit()
        finally:
            trainer.close()
    return images_per_s(ours_s, batch), images_per_s(plain_s[:len(ours_s)], batch), plain


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engines", default="ddp,fsdp", help="engines run at --nproc ranks beside single vs plain")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=1, help="repeats of every measurement (medians)")
    parser.add_argument("--only", default=",".join(CASES), help="cases, e.g. resnet18@32,resnet50@224")
    parser.add_argument("--channels-last", action="store_true", help="NHWC images and weights on both sides")
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e and e != "single"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.only.split(","):
            preset, px = case.split("@")
            batch = CASES[case]
            data = Path(tmp) / f"px{px}"
            if not data.exists():
                # an image set as bigtrain reads it: train/ and a small val/ of the same classes
                write_synthetic(data / "train", n=max(256, batch * args.steps), resolution=int(px), class_seed=0)
                write_synthetic(data / "val", n=64, resolution=int(px), seed=1, class_seed=0)
            speeds: dict[str, list] = {}
            for _ in range(args.rounds):
                single, plain, loop = single_and_plain_in_turn(preset, data, batch, args.steps, Path(tmp),
                                                               args.channels_last)
                speeds.setdefault("plain", []).append(plain)
                speeds.setdefault("single", []).append(single)
                for engine in engines:
                    speeds.setdefault(engine, []).append(engine_images_per_s(
                        preset, data, batch, args.steps, engine, args.nproc, Path(tmp), args.channels_last))
            row = {"model": preset, "px": int(px), "stem": "cifar" if loop.model.config.model_type != "resnet"
                   else "imagenet", "params": sum(p.numel() for p in loop.model.parameters()), "global_batch": batch}
            for name, values in speeds.items():
                numbers = [v for v in values if isinstance(v, float)]
                row[f"{name}_images_per_s"] = round(statistics.median(numbers), 2) if len(numbers) == len(values) \
                    else values[-1]
                if args.rounds > 1:
                    row[f"{name}_rounds"] = values
            ratios = [round(s / p, 3) for s, p in zip(speeds["single"], speeds["plain"])]
            row["ratio_single_over_plain"] = statistics.median(ratios)  # of the rounds, each a step-by-step pair
            if args.rounds > 1:
                row["ratio_rounds"] = ratios
            results.append(row)
            print(json.dumps(row), file=sys.stderr)
    print(json.dumps({"benchmark": "cnn", "threads_single": torch.get_num_threads(), "nproc": args.nproc,
                      "steps": args.steps, "rounds": args.rounds, "precision": "fp32",
                      "channels_last": args.channels_last, "results": results}, indent=2))


if __name__ == "__main__":
    main()

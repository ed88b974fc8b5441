"""Images/s of the ResNet presets through bigtrain beside a plain PyTorch loop on the same model.

    python benchmarks/cnn.py [--engines single,ddp,fsdp] [--nproc 2] [--steps 8] [--rounds 1] [--only resnet18@32]
                             [--channels-last]

For ResNet-18 and ResNet-50 at 32 px (the CIFAR stem) and 224 px (the ImageNet stem), on synthetic
3-channel images: bigtrain trains through the real CLI under each engine (single: one process,
ddp/fsdp: ``--nproc`` ranks, one thread each; numbers from metrics.jsonl, the first logged
interval, which includes warm-up, dropped), and a plain loop (the same model, ImageStream batches,
torch SGD with momentum, fp32) runs in a fresh process too. ``--rounds N`` alternates them N times (plain,
then each engine) and reports the medians. ``--channels-last``: NHWC images and weights on both
sides (bigtrain's ``model.channels_last``). Prints JSON with images/s and the ratio bigtrain
single / plain.
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bigtrain.config import ModelSection
from bigtrain.data.images import ImageStream, write_synthetic
from bigtrain.models.resnet import build_resnet

# name@px -> global batch (the same for every engine: 2 ranks take half each)
CASES = {"resnet18@32": 64, "resnet50@32": 32, "resnet18@224": 16, "resnet50@224": 8}
ENGINES = {"single": ["strategy.name=single"], "ddp": ["strategy.name=ddp"], "fsdp": ["strategy.name=fsdp"]}
TRAIN = ["optim.lr=0.01", "optim.weight_decay=0", "schedule.warmup_steps=0", "schedule.decay=constant",
         "train.grad_clip=0", "precision=fp32"]  # on configs/resnet50-synthetic.yaml (sgd, momentum 0.9)


def bigtrain_images_per_s(preset: str, data: Path, batch: int, steps: int, engine: str, nproc: int,
                          workdir: Path, channels_last: bool = False) -> float | str:
    run_dir = workdir / f"{preset}-{data.name}-{engine}"
    ranks = 1 if engine == "single" else nproc
    cmd = [sys.executable, "-m", "launcher.cli", "train", "configs/resnet50-synthetic.yaml", "--nproc", str(ranks),
           f"run.dir={run_dir}", f"data.path={data}", "data.download=null", f"model.preset={preset}",
           f"train.max_steps={steps}",
           f"train.global_batch_size={batch}", f"train.micro_batch_size={batch // ranks}",
           f"train.log_every={max(1, steps // 4)}", "train.eval_every=0", "train.eval_batches=1",
           "checkpoint.save_final=false", "checkpoint.resume=never", "tracking.console=plain", *TRAIN,
           *ENGINES[engine], f"model.channels_last={str(channels_last).lower()}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        return "error: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    return round(statistics.mean(r["samples_per_s"] for r in records), 1)


def plain_images_per_s(preset: str, data: Path, batch: int, steps: int,
                       channels_last: bool = False) -> tuple[float, int, str]:
    """A plain loop: forward, cross-entropy, backward, SGD step; the first third of the steps is warm-up."""
    stream = ImageStream(data / "train", batch, batch, seed=0)
    _, channels, px, _ = stream.manifest["shape"]
    torch.manual_seed(0)
    model = build_resnet(ModelSection(name="resnet", preset=preset), channels, stream.manifest["num_classes"], px)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    warm = max(1, steps // 3)
    for step in range(steps):
        if step == warm:
            t0 = time.perf_counter()
        b = stream.micro_batch_at(step)
        loss = F.cross_entropy(model(pixel_values=b["images"].contiguous(memory_format=layout)).logits, b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    params = sum(p.numel() for p in model.parameters())
    return round((steps - warm) * batch / (time.perf_counter() - t0), 1), params, model.config.model_type


def plain_in_subprocess(preset: str, data: Path, batch: int, steps: int,
                        channels_last: bool = False) -> tuple[float, int, str]:
    """:func:`plain_images_per_s` in a fresh process, as bigtrain runs: measured in this process
    after a training loop, bigtrain ran ~10% slower (resnet50 @ 32 px: 12.0 images/s before the
    plain loop ran here, 10.9 after), so each side gets an interpreter of its own."""
    spec = json.dumps([preset, str(data), batch, steps, channels_last])
    proc = subprocess.run([sys.executable, __file__, "--plain", spec], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    if sys.argv[1:2] == ["--plain"]:  # the plain loop alone, in its own process (plain_in_subprocess)
        preset, data, batch, steps, channels_last = json.loads(sys.argv[2])
        print(json.dumps(plain_images_per_s(preset, Path(data), batch, steps, channels_last)))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--engines", default="single,ddp,fsdp")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1, help="alternations of plain and the engines (medians)")
    parser.add_argument("--only", default=",".join(CASES), help="cases, e.g. resnet18@32,resnet50@224")
    parser.add_argument("--channels-last", action="store_true", help="NHWC images and weights on both sides")
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e]
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
                plain, params, model_type = plain_in_subprocess(preset, data, batch, args.steps, args.channels_last)
                speeds.setdefault("plain", []).append(plain)
                for engine in engines:
                    speeds.setdefault(engine, []).append(bigtrain_images_per_s(
                        preset, data, batch, args.steps, engine, args.nproc, Path(tmp), args.channels_last))
            row = {"model": preset, "px": int(px), "stem": "cifar" if model_type != "resnet" else "imagenet",
                   "params": params, "global_batch": batch}
            for name, values in speeds.items():
                numbers = [v for v in values if isinstance(v, float)]
                key = "plain_images_per_s" if name == "plain" else f"{name}_images_per_s"
                row[key] = round(statistics.median(numbers), 1) if len(numbers) == len(values) else values[-1]
                if args.rounds > 1:
                    row[key.replace("_images_per_s", "_rounds")] = values
            plain = row["plain_images_per_s"]
            if isinstance(row.get("single_images_per_s"), float):
                row["ratio_single_over_plain"] = round(row["single_images_per_s"] / plain, 3)
            results.append(row)
            print(json.dumps(row), file=sys.stderr)
    print(json.dumps({"benchmark": "cnn", "threads_single": torch.get_num_threads(), "nproc": args.nproc,
                      "steps": args.steps, "rounds": args.rounds, "precision": "fp32",
                      "channels_last": args.channels_last, "results": results}, indent=2))


if __name__ == "__main__":
    main()

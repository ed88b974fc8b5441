"""bigtrain beside its peers: a hand-written PyTorch loop and the transformers Trainer, on the same
model, data, precision, optimizer settings and step count. Prints one JSON object.

    python benchmarks/peers.py [--quick] [--rounds 3] [--steps 30] [--text FILE] [key=value ...]

The three run alternately (bigtrain, plain, Trainer, bigtrain, ...) in this process, for every
setting (eager / compiled, and the precisions that make sense here), several rounds; each number
is tokens per step over the median step time of the steps after the first third (warm-up,
compilation): on a shared 2-core VM single steps stall now and then, and a median step is
robust to that where a mean over the run is not. Reported: each system's tokens/s per round and
median, ``ratio_vs_plain`` and ``ratio_vs_hf_trainer`` for the same settings, and the same
ratios between each system's best settings.

* bigtrain: ``bigtrain.train.train`` on the config (single process), as ``bigtrain train`` runs it.
* plain: the loop a careful user writes: the same model init and data order, fused AdamW with
  bigtrain's parameter groups and schedule, autocast for bf16, ``torch.compile`` when asked.
* Trainer: ``transformers.Trainer`` in its fastest settings here: fused AdamW, bf16 when asked,
  ``torch_compile`` when asked, no logging, saving or evaluation.

On CPU the model is ``configs/gpt-tiny.yaml`` (4 layers, d=256, seq 256); with CUDA the
GPT-2-small shape (12 layers, d=768, seq 1024, vocab 8192, micro-batch 16) in bf16. ``--quick``
(CPU): fp32 eager, and bf16 compiled where the CPU has native bf16 instructions (fp32 compiled
where it has not); global batch 8 (one micro-batch), 3 rounds of 10 steps (under 3 minutes on 2
cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bigtrain import train as bt_train  # noqa: E402
from bigtrain.config import RunConfig, load_config  # noqa: E402
from bigtrain.data.prepare import prepare  # noqa: E402
from bigtrain.data.shards import PreparedData  # noqa: E402
from bigtrain.data.stream import CausalLMStream  # noqa: E402
from bigtrain.models import build_causal_lm  # noqa: E402
from bigtrain.optim import adamw_kwargs, lr_at, param_groups  # noqa: E402
from bigtrain.perf import cpu_low_precision_slowdown  # noqa: E402
from bigtrain.tracking.jsonl import read_jsonl  # noqa: E402

GPU_SHAPE = ["model.n_layer=12", "model.n_head=12", "model.d_model=768", "data.tokenizer.vocab_size=8192",
             "train.seq_len=1024", "train.micro_batch_size=16", "train.global_batch_size=16", "precision=bf16"]


def stream_for(cfg: RunConfig, data: PreparedData) -> CausalLMStream:
    """The sample order bigtrain's causal-LM task reads (one process)."""
    return CausalLMStream(sources=[data], seq_len=cfg.train.seq_len, global_batch=cfg.train.global_batch_size,
                          micro_batch=cfg.train.micro_batch_size, seed=cfg.seed, weights=cfg.data.weights,
                          shuffle=cfg.data.shuffle, shuffle_buffer=cfg.data.shuffle_buffer)


def tokens_per_s(times: list[float], tokens_per_step: int) -> float:
    """``times``: the clock before the first step and after each step. Tokens per step over the
    median duration of the steps after the first third."""
    steps = [b - a for a, b in zip(times, times[1:])]
    return tokens_per_step / statistics.median(steps[len(steps) // 3:])


def run_bigtrain(cfg: RunConfig, steps: int, workdir: Path) -> tuple[float, list[float]]:
    run = cfg.model_copy(deep=True)
    run.run.dir = str(workdir / f"bigtrain-{time.monotonic_ns()}")
    run.train.max_steps, run.train.log_every, run.train.eval_every = steps, 1, 0
    run.train.eval_batches, run.train.sample_tokens = 1, 0
    run.checkpoint.save_final, run.checkpoint.resume = False, "never"
    run.tracking.console = "plain"
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the JSON
        bt_train.train(run)
    records = read_jsonl(Path(run.run.dir) / "metrics.jsonl")
    times = [0.0] + [r["elapsed_s"] for r in records]  # the loop's clock starts before step 1
    return tokens_per_s(times, cfg.train.global_batch_size * cfg.train.seq_len), [r["loss"] for r in records]


def run_plain(cfg: RunConfig, data: PreparedData, steps: int) -> tuple[float, list[float]]:
    """The hand-written loop: what bigtrain must match in losses and at least match in speed."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    model = build_causal_lm(cfg.model, data.vocab_size, cfg.train.seq_len).to(device)
    groups = param_groups(model, cfg.optim.weight_decay)
    opt = torch.optim.AdamW(groups, **adamw_kwargs(cfg.optim, [p for g in groups for p in g["params"]]))
    forward = torch.compile(model) if cfg.train.compile else model
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    batches = iter(stream_for(cfg, data))
    accum = cfg.train.global_batch_size // cfg.train.micro_batch_size
    times, losses = [time.perf_counter()], []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, cfg.optim.lr, cfg.schedule)
        total = torch.zeros((), device=device)
        for _ in range(accum):
            batch = next(batches)
            batch = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "labels")}
            with torch.autocast(device.type, dtype=low, enabled=low is not None):
                logits = forward(input_ids=batch["input_ids"]).logits
                loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch["labels"].reshape(-1))
            (loss / accum).backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append((total / accum).item())  # the per-step host sync bigtrain does at log_every=1
        times.append(time.perf_counter())
    return tokens_per_s(times, cfg.train.global_batch_size * cfg.train.seq_len), losses


class _Windows(torch.utils.data.Dataset):
    """The same token windows for the Trainer (which shifts labels itself)."""

    def __init__(self, cfg: RunConfig, data: PreparedData, n: int):
        stream, self.items = iter(stream_for(cfg, data)), []
        while len(self.items) < n:
            batch = next(stream)
            self.items += [{"input_ids": x, "labels": x.clone()} for x in batch["input_ids"]]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def run_hf_trainer(cfg: RunConfig, data: PreparedData, steps: int, workdir: Path) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.times:
                self.times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    torch.manual_seed(cfg.seed)
    model = build_causal_lm(cfg.model, data.vocab_size, cfg.train.seq_len)
    accum = cfg.train.global_batch_size // cfg.train.micro_batch_size
    args = TrainingArguments(
        output_dir=str(workdir / f"hf-{time.monotonic_ns()}"), max_steps=steps,
        per_device_train_batch_size=cfg.train.micro_batch_size, gradient_accumulation_steps=accum,
        learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.beta1,
        adam_beta2=cfg.optim.beta2, adam_epsilon=cfg.optim.eps, max_grad_norm=cfg.train.grad_clip,
        lr_scheduler_type="cosine", warmup_steps=cfg.schedule.warmup_steps, optim="adamw_torch_fused",
        bf16=cfg.precision == "bf16", fp16=cfg.precision == "fp16", torch_compile=cfg.train.compile,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), seed=cfg.seed)
    timer = StepTimes()
    trainer = Trainer(model=model, args=args, train_dataset=_Windows(cfg, data, steps * cfg.train.global_batch_size),
                      callbacks=[timer])
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    return tokens_per_s(timer.times, cfg.train.global_batch_size * cfg.train.seq_len)


QUICK = ["train.global_batch_size=8", "train.micro_batch_size=8"]  # one micro-batch a step


def settings(quick: bool, cuda: bool) -> dict[str, list[str]]:
    if cuda:
        return {"bf16": [], "bf16+compile": ["train.compile=true"]}
    out = {"fp32": ["precision=fp32"], "fp32+compile": ["precision=fp32", "train.compile=true"]}
    if not quick:
        out.update({"bf16": ["precision=bf16"], "bf16+compile": ["precision=bf16", "train.compile=true"]})
    elif cpu_low_precision_slowdown(torch.device("cpu"), "bf16") < 2:
        # native bf16: eager fp32 (the baseline) and bf16 compiled (every system's best here)
        out = {"fp32": out["fp32"], "bf16+compile": ["precision=bf16", "train.compile=true"]}
    return out


def ratios(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: round(a[k] / b[k], 3) for k in a if k in b and b[k]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CPU: fp32 eager, bf16 compiled (fp32 compiled without native bf16), batch 8, 3 rounds "
                             "of 10 steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--text", help="the corpus (default: the recipe's data.path)")
    parser.add_argument("--systems", default="bigtrain,plain,hf_trainer")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    rounds, steps = (3, 10) if args.quick else (args.rounds, args.steps)
    quick = QUICK if args.quick and not cuda else []
    base = ["tracking.wandb.mode=disabled", *(GPU_SHAPE if cuda else []), *quick, *args.overrides]
    if args.text:
        base.append(f"data.path={args.text}")
    systems = args.systems.split(",")
    results: dict[str, dict[str, list[float]]] = {s: {} for s in systems}
    t0 = time.perf_counter()
    # stdout is for the JSON: libraries' warnings (DeepSpeed's logger binds the stream it finds at
    # import) and the runs' progress go to stderr
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        for name, extra in settings(args.quick, cuda).items():
            cfg = load_config(ROOT / "configs" / "gpt-tiny.yaml", [*base, *extra])
            data = prepare(cfg.data, log=lambda _m: None)
            for _ in range(rounds):
                for system in systems:
                    if system == "bigtrain":
                        speed = run_bigtrain(cfg, steps, Path(tmp))[0]
                    elif system == "plain":
                        speed = run_plain(cfg, data, steps)[0]
                    else:
                        speed = run_hf_trainer(cfg, data, steps, Path(tmp))
                    results[system].setdefault(name, []).append(round(speed, 1))
    medians = {s: {k: round(statistics.median(v), 1) for k, v in r.items()} for s, r in results.items()}
    best = {s: max(m.items(), key=lambda kv: kv[1]) for s, m in medians.items() if m}
    report = {
        "benchmark": "peers",
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu, {torch.get_num_threads()} threads",
        "model": f"{cfg.model.name} {cfg.model.n_layer}L d{cfg.model.d_model} seq {cfg.train.seq_len} "
                 f"vocab {data.vocab_size}", "global_batch": cfg.train.global_batch_size,
        "rounds": rounds, "steps_per_round": steps, "tokens_per_s": results, "median_tokens_per_s": medians,
        "best": {s: {"setting": k, "tokens_per_s": v} for s, (k, v) in best.items()},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if "bigtrain" in medians and "plain" in medians:
        report["ratio_vs_plain"] = ratios(medians["bigtrain"], medians["plain"])
        report["best_ratio_vs_plain"] = round(best["bigtrain"][1] / best["plain"][1], 3)
    if "bigtrain" in medians and "hf_trainer" in medians:
        report["ratio_vs_hf_trainer"] = ratios(medians["bigtrain"], medians["hf_trainer"])
        report["best_ratio_vs_hf_trainer"] = round(best["bigtrain"][1] / best["hf_trainer"][1], 3)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

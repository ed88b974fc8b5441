"""The training loop, run on every rank: ``python -m bigtrain.train CONFIG [key=value ...]``.

Plain, top to bottom. Engine details live in ``bigtrain.strategies``; nothing here knows which
engine runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as tdist

from bigtrain import dist
from bigtrain.checkpoint import CheckpointError, CheckpointManager, CheckpointSaveError
from bigtrain.config import ConfigError, RunConfig, load_config
from bigtrain.data.errors import DataError
from bigtrain.data.stream import StatefulLoader
from bigtrain.optim import lr_at
from bigtrain.preemption import Preemption
from bigtrain.perf import cpu_low_precision_slowdown, peak_flops
from bigtrain.sample import sample_text
from bigtrain.strategies import build_strategy
from bigtrain.tasks import Task, build_task
from bigtrain.tracking import Tracker

from bigtrain.exit_codes import BAD_INPUT as EXIT_BAD_INPUT
from bigtrain.exit_codes import FAILED as EXIT_FAILED
from bigtrain.exit_codes import OK as EXIT_OK
from bigtrain.exit_codes import REQUEUE as EXIT_REQUEUE


# Tests slow the loop down to kill or signal a run at a chosen step (fault injection).
STEP_DELAY_S = float(os.environ.get("BIGTRAIN_TEST_STEP_DELAY_S", "0"))


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    val_loss: Optional[float]
    checkpoint: Optional[Path]
    preempted: bool = False


class SampleLog:
    """``data.log_samples``: every micro-batch's (step, source, sample) ids, one JSON line per
    micro-batch in ``samples-rank<R>.jsonl`` (appended across restarts), to audit the order."""

    def __init__(self, run_dir: Path, rank: int):
        self.fh = open(run_dir / f"samples-rank{rank}.jsonl", "a")

    def write(self, step: int, batch: dict) -> None:
        record = {"step": step, **{k: batch[k].tolist() for k in ("position", "source", "sample") if k in batch}}
        self.fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.fh.close()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def mean_over_ranks(value: torch.Tensor) -> float:
    """Host-syncing mean across ranks (only called at log/eval intervals)."""
    value = value.detach().float().clone()
    if tdist.is_initialized():
        tdist.all_reduce(value)
        value /= tdist.get_world_size()
    return value.item()


def evaluate(strategy, task: Task) -> Optional[dict[str, float]]:
    """The task's validation metrics (None when it has no validation data)."""
    sets = task.eval_sets()
    if not sets:
        return None
    strategy.train_mode(False)
    sums = []
    for batches in sets:
        total = None
        for batch in batches:  # summed on the compute device: one host sync per evaluation
            stats = strategy.evaluate(batch, task.eval_stats).float()
            total = stats if total is None else total + stats
        sums.append(total)
    strategy.train_mode(True)
    stacked = torch.stack(sums).to(strategy.device)  # the group's backend for this device reduces it
    if tdist.is_initialized():
        tdist.all_reduce(stacked)
    return task.eval_metrics(list(stacked.cpu()))


def train(cfg: RunConfig) -> TrainResult:
    dist.check_precision_supported(cfg.precision)
    info = dist.init(threads=cfg.train.threads, always=cfg.strategy.name != "single",
                     accelerator=cfg.resources.accelerator)
    cfg.check_world_size(info.world_size)
    run_dir = cfg.run_dir
    tracker_log = print if info.is_main else (lambda _msg: None)

    task = build_task(cfg, info, tracker_log)
    task.prepare()
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    seed_everything(cfg.seed)
    model = task.build_model()
    run_files = task.save_run_files(run_dir, model)
    dist.barrier()
    flops_per_sample = task.flops_per_sample(model)
    n_params = sum(p.numel() for p in model.parameters())
    strategy = build_strategy(cfg, info)
    strategy.objective = task.objective
    strategy.setup(model)

    ckpt = CheckpointManager(run_dir, cfg.checkpoint, info, log=tracker_log, extra_files=run_files)
    start_step, resumed_from, resume_state = 0, ckpt.agreed_resume_path(), {}
    if resumed_from is not None:
        resume_state = ckpt.load(resumed_from, strategy, cfg.model.model_dump(mode="json"))
        start_step = resume_state["step"]

    tracker = Tracker(cfg, run_dir, info.is_main, start_step)
    tracker.log(f"run {cfg.run.name}: {cfg.task}, {n_params / 1e6:.2f}M params, strategy {strategy.name} x {info.world_size} "
                f"({info.device.type}/{info.backend}), {strategy.details()}, precision {cfg.precision}, run dir {run_dir}")
    slowdown = cpu_low_precision_slowdown(info.device, cfg.precision) if info.is_main else 1.0  # only rank 0 logs
    if slowdown > 2:
        tracker.log(f"warning: precision {cfg.precision}: a matmul runs {slowdown:.0f}x slower than in fp32 on this CPU "
                    f"(no native {cfg.precision} instructions); training will be slow: use precision=fp32 here")
    if cfg.model.pretrained:
        tracker.log(f"fine-tuning {cfg.model.pretrained} (tokenizer: {cfg.data.tokenizer.path})")
    if resumed_from:
        tracker.log(f"resumed from {resumed_from} at step {start_step}")

    reader = StatefulLoader(task.train_stream(), cfg.data.num_workers, cfg.data.prefetch_factor,
                            pin_memory=info.device.type == "cuda")
    if "data" in resume_state:
        reader.load_state_dict(resume_state["data"])
    else:  # a fresh run, or a checkpoint from before the reader state was saved: step s read s*B samples
        reader.stream.start = start_step * cfg.train.global_batch_size
    sample_log = SampleLog(run_dir, info.rank) if cfg.data.log_samples else None
    accum = cfg.grad_accum_steps(info.world_size)
    samples_per_step = cfg.train.global_batch_size
    tokens_per_step = samples_per_step * task.tokens_per_sample  # 0 for images
    peak = peak_flops(info.device, cfg.precision)
    max_steps = cfg.train.max_steps
    val_loss: Optional[float] = resume_state.get("val_loss")
    preempt = Preemption(info.device, cfg.checkpoint.every_minutes)
    stop = False

    t_start = t_last = time.perf_counter()
    last_logged = start_step
    loss_sum = torch.zeros((), device=info.device)
    for step in range(start_step, max_steps):
        lr = lr_at(step, max_steps, cfg.optim.lr, cfg.schedule)
        for micro in range(accum):
            batch = reader.next()
            if sample_log:
                sample_log.write(step, batch)
            loss_sum += strategy.forward_backward(batch, scale=1.0 / accum, last_micro=micro == accum - 1)
        grad_norm = strategy.step(lr)
        done = step + 1

        if done % cfg.train.log_every == 0 or done == max_steps:
            loss = mean_over_ranks(loss_sum) / (accum * (done - last_logged))
            now = time.perf_counter()
            sps = samples_per_step * (done - last_logged) / (now - t_last)
            record = {"step": done, "loss": loss, "lr": lr, "grad_norm": float(grad_norm)}
            if tokens_per_step:
                record.update(tokens_per_s=sps * task.tokens_per_sample, tokens_seen=done * tokens_per_step)
            record.update({
                "samples_per_s": sps, "samples_seen": done * samples_per_step, "elapsed_s": now - t_start,
                "epoch": reader.stream.epoch_of(reader.state_dict()["position"]),
                "mfu": flops_per_sample * sps / (peak * info.world_size),
                **{f"mem_{k}": v for k, v in strategy.memory_report().items()},
            })
            if not math.isfinite(loss):
                tracker.log(f"step {done}: loss is {loss}; stopping")
                raise FloatingPointError(f"loss became {loss} at step {done}")
            tracker.log_metrics(record)
            loss_sum.zero_()
            t_last, last_logged = time.perf_counter(), done

        if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == max_steps:
            evals = evaluate(strategy, task)
            if evals is not None:
                val_loss = evals["val_loss"]
                tracker.log_eval({"step": done, **evals})
            t_last = time.perf_counter()  # eval time is not training throughput

        if STEP_DELAY_S:
            time.sleep(STEP_DELAY_S)
        stop, time_due = preempt.poll()  # agreed across ranks
        ckpt.poll()  # commits a finished async save
        last = done == max_steps
        periodic = (cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0) or time_due
        if periodic or (last and cfg.checkpoint.save_final) or (stop and cfg.checkpoint.save_on_preempt):
            state = {"step": done, "tokens_seen": done * tokens_per_step, "samples_seen": done * samples_per_step,
                     "val_loss": val_loss, "data": reader.state_dict()}
            ckpt.save(done, strategy, state, cfg.to_yaml(), asynchronous=cfg.checkpoint.async_ and not (stop or last))
            preempt.mark_saved()
            t_last = time.perf_counter()
        if stop:
            break
    ckpt.wait()
    reader.close()
    if sample_log:
        sample_log.close()
    preempt.restore()
    last_ckpt = ckpt.last_committed
    if stop:
        tracker.log(f"preempted ({preempt.requested}) after step {done}: checkpoint {last_ckpt}; "
                    f"exiting with code {EXIT_REQUEUE} (requeue to resume)")
        strategy.close()
        tracker.close()
        dist.barrier()
        return TrainResult(run_dir, done, val_loss, last_ckpt, preempted=True)

    if cfg.task == "causal_lm" and cfg.train.sample_tokens and start_step < max_steps:
        text = sample_text(strategy, task.tokenizer, cfg, cfg.train.sample_prompt, cfg.train.sample_tokens)
        tracker.log("sample:\n" + text.strip("\n"))

    if info.is_main:
        tracker.log(f"run dir:     {run_dir}")
        tracker.log(f"checkpoint:  {last_ckpt}")
        tracker.log(f"metrics:     {run_dir / 'metrics.jsonl'}  eval: {run_dir / 'eval.jsonl'}")
        for line in task.summary(val_loss):
            tracker.log(line)
    strategy.close()
    tracker.close()
    dist.barrier()
    return TrainResult(run_dir, max_steps, val_loss, last_ckpt)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m bigtrain.train CONFIG [key=value ...]")
        return EXIT_OK if argv else EXIT_BAD_INPUT
    try:
        cfg = load_config(argv[0], argv[1:])
        result = train(cfg)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except CheckpointSaveError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        dist.shutdown()
    return EXIT_REQUEUE if result.preempted else EXIT_OK


def exit_now(code: int) -> None:
    """Exit once the run is over (files closed, process groups destroyed), skipping interpreter
    teardown. Engines can leave objects alive that hold process groups (ZeRO-3 keeps its model
    in module-level caches); freed during teardown, they can make gloo abort a run that has
    finished ("terminate called without an active exception", exit -6: a ZeRO-2 job in CI)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())

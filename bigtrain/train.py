"""The training loop, run on every rank: ``python -m bigtrain.train CONFIG [key=value ...]``.

Three parts, top to bottom: :meth:`Trainer.setup` builds the run, :meth:`Trainer.fit` is the
loop, :meth:`Trainer.close` tears it down and is always reached (after an error or Ctrl-C too).
Engines live in ``bigtrain.strategies``, tasks (data, model, objective, evaluation) in
``bigtrain.tasks``, when and what to checkpoint in ``bigtrain.checkpoint``: nothing here knows
which engine, task or reader runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

from bigtrain import dist
from bigtrain.checkpoint import CheckpointError, CheckpointManager, CheckpointSaveError
from bigtrain.config import ConfigError, RunConfig, load_config
from bigtrain.data.errors import DataError
from bigtrain.data.stream import StatefulLoader
from bigtrain.exit_codes import BAD_INPUT, FAILED, INTERRUPTED, OK
from bigtrain.heartbeat import Heartbeat
from bigtrain.interrupts import StopRequests
from bigtrain.models.lora import apply_lora
from bigtrain.models.params import param_count
from bigtrain.optim import lr_at
from bigtrain.perf import cpu_low_precision_slowdown, peak_flops
from bigtrain.strategies import build_strategy, model_init_context
from bigtrain.tasks import Task, build_task
from bigtrain.tracking import Tracker
from bigtrain.tracking.step_metrics import StepMetrics

EXPECTED_ERRORS = (ConfigError, DataError, CheckpointError, CheckpointSaveError)


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    val_loss: float | None
    checkpoint: Path | None
    exit_code: int = OK  # exit_codes.REQUEUE after a preemption, INTERRUPTED after Ctrl-C


@dataclass
class TrainState:
    """The trainer's counters, saved in every checkpoint (``trainer_state.json``)."""

    samples_per_step: int
    tokens_per_step: int  # 0 for tasks that are not text
    step: int = 0  # optimizer steps done
    val_loss: float | None = None
    last_eval: dict[str, Any] | None = None  # the latest evaluation, with its step (checkpoint.keep_best)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.step * self.tokens_per_step,
                "samples_seen": self.step * self.samples_per_step, "val_loss": self.val_loss, "eval": self.last_eval}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.val_loss, self.last_eval = int(state["step"]), state.get("val_loss"), state.get("eval")


class TrainingFailed(RuntimeError):
    """An unexpected error during a run; the message says where (setup or which step) and what."""


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


# Test hooks: slow the loop down to signal or kill a run at a chosen step; fail inside the loop.
STEP_DELAY_S = float(os.environ.get("BIGTRAIN_TEST_STEP_DELAY_S", "0"))


def injected_faults(step: int, rank: int) -> None:
    """Fault injection at the start of ``step``: ``BIGTRAIN_FAULT=loop-error@<step>`` raises,
    ``stall@<step>`` sleeps for an hour (a hung rank); ``BIGTRAIN_FAULT_RANK`` limits it to one rank."""
    fault = os.environ.get("BIGTRAIN_FAULT", "")
    if not fault.endswith(f"@{step}") or os.environ.get("BIGTRAIN_FAULT_RANK", str(rank)) != str(rank):
        return
    if fault.startswith("loop-error@"):
        raise RuntimeError(f"injected failure at step {step} (BIGTRAIN_FAULT)")
    if fault.startswith("stall@"):
        time.sleep(3600)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def evaluate(strategy, task: Task) -> dict[str, float] | None:
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


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.phase = "setup"
        self._teardown = contextlib.ExitStack()  # what setup acquired, released in reverse order
        self._failed = False

    # -- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, on_close = self.cfg, self._teardown.callback
        dist.check_precision_supported(cfg.precision)
        # the process group's own timeout comes after bigtrain's watchdog (a clearer report)
        info = self.info = dist.init(threads=cfg.train.threads, always=cfg.strategy.name != "single",
                                     accelerator=cfg.resources.accelerator,
                                     timeout_s=max(600.0, cfg.train.collective_timeout_s + 120))
        cfg.check_world_size(info.world_size)
        self.run_dir = cfg.run_dir
        self.log = print if info.is_main else (lambda _msg: None)

        self.task = task = build_task(cfg, info, self.log)
        task.prepare()
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        seed_everything(cfg.seed)
        with model_init_context(cfg, info):  # ZeRO-3 builds a pretrained model partitioned
            model = task.build_model()
        if cfg.model.lora is not None:
            model = apply_lora(model, cfg.model.lora, cfg.task)
        model.train()  # from_pretrained returns a model in eval mode: no dropout until the first evaluation
        run_files = task.save_run_files(self.run_dir, model)
        dist.barrier()
        self.heartbeat = Heartbeat(self.run_dir, info.rank, info.world_size, cfg.train.collective_timeout_s,
                                   self.log, dump_collectives=dist.collective_trace_dumper(info))
        on_close(lambda: self.heartbeat.close(failed=self._failed))
        # on rank 0: the other ranks may hold the structure alone (meta device, partitions)
        flops_per_sample = task.on_main(lambda: task.flops_per_sample(model))
        n_params, n_trainable = param_count(model), param_count(model, trainable=True)
        objective = task.objective
        if cfg.distill is not None:  # a frozen teacher beside the engine: never in the optimizer or checkpoints
            from bigtrain.tasks.distill import Distiller

            distiller = Distiller.build(cfg, task, model, info, self.log)
            objective = distiller.objective
            flops_per_sample += distiller.teacher_flops_per_sample()
        self.strategy = build_strategy(cfg, info, objective)
        on_close(self.strategy.close)
        self.strategy.setup(model)

        cuda = info.device.type == "cuda"
        self.reader = StatefulLoader(task.train_stream(), cfg.data.num_workers, cfg.data.prefetch_factor,
                                     pin_memory=cuda, device=info.device if cuda and cfg.data.prefetch_to_device
                                     else None)
        on_close(self.reader.close)
        samples_per_step = cfg.train.global_batch_size
        self.state = TrainState(samples_per_step, samples_per_step * task.tokens_per_sample)
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint, info, log=self.log, extra_files=run_files)
        self.ckpt.attach(self.strategy, cfg.to_yaml(), cfg.model.model_dump(mode="json"),
                         trainer=self.state, data=self.reader)
        on_close(lambda: self.ckpt.close(error=self._failed))
        resumed_from = self.ckpt.resume()
        self.start_step = self.state.step

        self.stops = StopRequests(info.device)
        on_close(self.stops.restore)
        # the launcher kills ranks stop_grace_s after a stop signal: a rank still here 5 s before says why
        self.heartbeat.watch_stop(self.stops.requested_at, cfg.resources.stop_grace_s - 5)
        self.tracker = Tracker(cfg, self.run_dir, info.is_main, self.start_step, on_stop=self.stops.prune)
        on_close(self.tracker.close)
        trains = f" ({n_trainable / 1e6:.3f}M trainable: LoRA r={cfg.model.lora.r})" if cfg.model.lora else ""
        self.tracker.log(f"run {cfg.run.name}: {cfg.task}, {n_params / 1e6:.2f}M params{trains}, strategy "
                         f"{self.strategy.name} x {info.world_size} ({info.device.type}/{info.backend}), "
                         f"{self.strategy.details()}, precision {cfg.precision}, run dir {self.run_dir}")
        slowdown = cpu_low_precision_slowdown(info.device, cfg.precision) if info.is_main else 1.0  # rank 0 logs
        if slowdown > 2:
            self.tracker.log(f"warning: precision {cfg.precision}: a matmul runs {slowdown:.0f}x slower than in fp32 "
                             f"on this CPU (no native {cfg.precision} instructions); training will be slow: use "
                             f"precision=fp32 here")
        if cfg.model.pretrained:
            self.tracker.log(f"fine-tuning {cfg.model.pretrained} (tokenizer: {cfg.data.tokenizer.path})")
        if resumed_from:
            self.tracker.log(f"resumed from {resumed_from} at step {self.start_step}")

        self.sample_log = SampleLog(self.run_dir, info.rank) if cfg.data.log_samples else None
        if self.sample_log:
            on_close(self.sample_log.close)
        self.metrics = StepMetrics(device=info.device, start_step=self.start_step, samples_per_step=samples_per_step,
                                   tokens_per_sample=task.tokens_per_sample, flops_per_sample=flops_per_sample,
                                   peak_flops=peak_flops(info.device, cfg.precision), world_size=info.world_size)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, state, strategy, reader = self.cfg, self.state, self.strategy, self.reader
        max_steps = cfg.train.max_steps
        accum = cfg.grad_accum_steps(self.info.world_size)
        stop = False
        beat = self.heartbeat.enter
        while state.step < max_steps and not stop:
            step = state.step + 1
            self.phase = f"step {step}"
            lr = lr_at(state.step, max_steps, cfg.optim.lr, cfg.schedule)
            for micro in range(accum):
                beat("data", step)
                injected_faults(step, self.info.rank)
                batch = reader.next()
                if self.sample_log:
                    self.sample_log.write(state.step, batch)
                beat("forward-backward")
                self.metrics.add_loss(strategy.forward_backward(batch, scale=1.0 / accum,
                                                                last_micro=micro == accum - 1))
            beat("optimizer")
            grad_norm = strategy.step(lr)
            state.step = step

            beat("log")
            if step % cfg.train.log_every == 0 or step == max_steps:
                record = self.metrics.record(step, lr=lr, grad_norm=grad_norm, epoch=reader.epoch,
                                             memory=strategy.memory_report)
                if not math.isfinite(record["loss"]):
                    self.tracker.log(f"step {step}: loss is {record['loss']}; stopping")
                    raise FloatingPointError(f"loss became {record['loss']} at step {step}")
                self.tracker.log_metrics(record)
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == max_steps:
                beat("eval")
                with self.metrics.paused():  # evaluation time is not training throughput
                    evals = evaluate(strategy, self.task)
                if evals is not None:
                    state.val_loss, state.last_eval = evals["val_loss"], {"step": step, **evals}
                    self.tracker.log_eval(state.last_eval)
            if STEP_DELAY_S:
                time.sleep(STEP_DELAY_S)
            beat("stop-poll")
            stop, time_due = self.stops.poll(self.ckpt.time_due())  # agreed across ranks
            beat("checkpoint")
            with self.metrics.paused():
                self.ckpt.step_end(step, last=step == max_steps, stop=stop, time_due=time_due)

        self.phase = "the end of the run"
        self.ckpt.close()  # the last save is committed
        last = self.ckpt.last_committed
        if stop:
            stops = self.stops
            why = "preempted" if stops.preempted else "interrupted" if stops.interrupted else "pruned"
            again = " (run the same command again to resume)" if why != "pruned" else ""
            self.tracker.log(f"{why} ({stops.requested}) after step {state.step}: checkpoint {last}; exiting with "
                             f"code {stops.exit_code}{again}")
        else:
            text = self.task.sample(strategy) if self.start_step < max_steps else None
            if text is not None:
                self.tracker.log("sample:\n" + text)
            if self.info.is_main:
                self.tracker.log(f"run dir:     {self.run_dir}")
                self.tracker.log(f"checkpoint:  {last}")
                self.tracker.log(f"metrics:     {self.run_dir / 'metrics.jsonl'}  eval: {self.run_dir / 'eval.jsonl'}")
                for line in self.task.summary(state.val_loss):
                    self.tracker.log(line)
        dist.barrier()
        return TrainResult(self.run_dir, state.step, state.val_loss, last,
                           exit_code=self.stops.exit_code if stop else OK)

    # -- teardown ---------------------------------------------------------------------------
    def close(self, failed: bool = False) -> None:
        """Release everything setup acquired, in reverse order: signal handlers, sample log,
        tracker, the in-flight checkpoint (committed; after a failure: abandoned, its directory
        removed), dataloader workers, the engine. Nothing collective runs after a failure."""
        self._failed = failed
        self._teardown.close()


def train(cfg: RunConfig) -> TrainResult:
    trainer = Trainer(cfg)
    failed = True
    try:
        trainer.setup()
        result = trainer.fit()
        failed = False
        return result
    except EXPECTED_ERRORS:
        raise
    except Exception as err:
        raise TrainingFailed(f"training failed in {trainer.phase}: {type(err).__name__}: {err}") from err
    finally:
        trainer.close(failed=failed)


def main(argv: list[str] | None = None) -> int:
    # Every rank writes to one inherited stderr, which Python leaves unbuffered: print's text and
    # its newline are two write(2)s, so two ranks' "error: ..." lines could run into one. Buffered
    # up to each newline, a line is one write.
    if isinstance(sys.stderr, io.TextIOWrapper):
        sys.stderr.reconfigure(line_buffering=True, write_through=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m bigtrain.train CONFIG [key=value ...]")
        return OK if argv else BAD_INPUT
    try:
        cfg = load_config(argv[0], argv[1:])
        return train(cfg).exit_code
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return BAD_INPUT
    except CheckpointSaveError as err:
        print(f"error: {err}", file=sys.stderr)
        return FAILED
    except KeyboardInterrupt:  # Ctrl-C before the loop could take it (data, model, engine setup)
        print("interrupted during setup: nothing to save", file=sys.stderr)
        return INTERRUPTED
    except TrainingFailed as err:
        traceback.print_exception(err.__cause__, file=sys.stderr)  # for whoever debugs it
        print(f"error: {err}", file=sys.stderr)  # the last line says what failed
        return FAILED
    finally:
        dist.shutdown()


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

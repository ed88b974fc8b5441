"""The training loop, run on every rank: ``python -m bigtrain.train CONFIG [key=value ...]``.

Plain, top to bottom. Engine details live in ``bigtrain.strategies``; nothing here knows which
engine runs.
"""

from __future__ import annotations

import json
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
from bigtrain.data.prepare import prepare_sources
from bigtrain.data.shards import PreparedData, open_prepared
from bigtrain.data.sources import DataError
from bigtrain.data.stream import CausalLMStream, StatefulLoader, eval_batches
from bigtrain.data.tokenizer import Tokenizer
from bigtrain.models import build_causal_lm, flops_per_token
from bigtrain.optim import lr_at
from bigtrain.preemption import Preemption
from bigtrain.perf import peak_flops
from bigtrain.sample import sample_text
from bigtrain.strategies import build_strategy
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
    unigram_entropy: float
    checkpoint: Optional[Path]
    preempted: bool = False


class SampleLog:
    """``data.log_samples``: every micro-batch's (step, source, sample) ids, one JSON line per
    micro-batch in ``samples-rank<R>.jsonl`` (appended across restarts), to audit the order."""

    def __init__(self, run_dir: Path, rank: int):
        self.fh = open(run_dir / f"samples-rank{rank}.jsonl", "a")

    def write(self, step: int, batch: dict) -> None:
        self.fh.write(json.dumps({"step": step, "position": batch["position"].tolist(),
                                  "source": batch["source"].tolist(), "sample": batch["sample"].tolist()}) + "\n")

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


def load_data(cfg: RunConfig, info: dist.DistInfo, log) -> list[PreparedData]:
    """Rank 0 prepares (or finds the cached) data sets; the others then open them."""
    roots = None
    if info.is_main:
        roots = [str(d.root) for d in prepare_sources(cfg.data, log=log)]
    roots = dist.broadcast_object(roots)
    return [open_prepared(root, verify="size") for root in roots]


def build_reader(cfg: RunConfig, sources: list[PreparedData], info: dist.DistInfo) -> StatefulLoader:
    stream = CausalLMStream(sources, cfg.train.seq_len, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                            info.rank, info.world_size, cfg.seed, weights=cfg.data.weights,
                            shuffle=cfg.data.shuffle, shuffle_buffer=cfg.data.shuffle_buffer)
    return StatefulLoader(stream, cfg.data.num_workers, cfg.data.prefetch_factor,
                          pin_memory=info.device.type == "cuda")


def evaluate(strategy, cfg: RunConfig, sources: list[PreparedData], info: dist.DistInfo) -> dict[str, float]:
    """Validation loss of every source, and ``val_loss``: their mean weighted like the mixture."""
    strategy.train_mode(False)
    totals = torch.zeros(len(sources), 2)
    for k, data in enumerate(sources):
        for x, y in eval_batches(data, cfg.train.seq_len, cfg.train.micro_batch_size, cfg.train.eval_batches,
                                 info.rank, info.world_size):
            totals[k] += torch.stack([strategy.eval_loss(x, y).float().cpu(), torch.tensor(1.0)])
    strategy.train_mode(True)
    if tdist.is_initialized():
        tdist.all_reduce(totals)
    losses = (totals[:, 0] / totals[:, 1]).tolist()
    weights = cfg.data.weights
    result = {"val_loss": sum(w * v for w, v in zip(weights, losses)) / sum(weights)}
    if len(sources) > 1:
        result.update({f"val_loss_{k}": v for k, v in enumerate(losses)})
    return result


def train(cfg: RunConfig) -> TrainResult:
    dist.check_precision_supported(cfg.precision)
    info = dist.init(threads=cfg.train.threads, always=cfg.strategy.name != "single")
    cfg.check_world_size(info.world_size)
    run_dir = cfg.run_dir
    tracker_log = print if info.is_main else (lambda _msg: None)

    sources = load_data(cfg, info, tracker_log)
    data = sources[0]
    tokenizer = Tokenizer.load(data.tokenizer_path)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        tokenizer.save(run_dir / "tokenizer.model")
    dist.barrier()

    seed_everything(cfg.seed)
    model = build_causal_lm(cfg.model, data.vocab_size, cfg.train.seq_len)
    fpt = flops_per_token(model, cfg.train.seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    strategy = build_strategy(cfg, info)
    strategy.setup(model)

    ckpt = CheckpointManager(run_dir, cfg.checkpoint, info, log=tracker_log,
                             extra_files=(run_dir / "tokenizer.model",))
    start_step, resumed_from, resume_state = 0, ckpt.agreed_resume_path(), {}
    if resumed_from is not None:
        resume_state = ckpt.load(resumed_from, strategy, cfg.model.model_dump(mode="json"))
        start_step = resume_state["step"]

    tracker = Tracker(cfg, run_dir, info.is_main, start_step)
    tracker.log(f"run {cfg.run.name}: {n_params / 1e6:.2f}M params, strategy {strategy.name} x {info.world_size} "
                f"({info.device.type}/{info.backend}), precision {cfg.precision}, run dir {run_dir}")
    if resumed_from:
        tracker.log(f"resumed from {resumed_from} at step {start_step}")

    reader = build_reader(cfg, sources, info)
    if "data" in resume_state:
        reader.load_state_dict(resume_state["data"])
    else:  # a fresh run, or a checkpoint from before the reader state was saved: step s read s*B samples
        reader.stream.start = start_step * cfg.train.global_batch_size
    sample_log = SampleLog(run_dir, info.rank) if cfg.data.log_samples else None
    accum = cfg.grad_accum_steps(info.world_size)
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
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
            loss_sum += strategy.forward_backward(batch["input_ids"], batch["labels"], scale=1.0 / accum,
                                                  last_micro=micro == accum - 1)
        grad_norm = strategy.step(lr)
        done = step + 1

        if done % cfg.train.log_every == 0 or done == max_steps:
            loss = mean_over_ranks(loss_sum) / (accum * (done - last_logged))
            now = time.perf_counter()
            tps = tokens_per_step * (done - last_logged) / (now - t_last)
            record = {
                "step": done, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                "tokens_per_s": tps, "elapsed_s": now - t_start, "tokens_seen": done * tokens_per_step,
                "epoch": reader.stream.epoch_of(reader.state_dict()["position"]), "mfu": fpt * tps / (peak * info.world_size),
                **{f"mem_{k}": v for k, v in strategy.memory_report().items()},
            }
            if not math.isfinite(loss):
                tracker.log(f"step {done}: loss is {loss}; stopping")
                raise FloatingPointError(f"loss became {loss} at step {done}")
            tracker.log_metrics(record)
            loss_sum.zero_()
            t_last, last_logged = time.perf_counter(), done

        if (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == max_steps:
            evals = evaluate(strategy, cfg, sources, info)
            val_loss = evals["val_loss"]
            tracker.log_eval({"step": done, **evals, "val_ppl": math.exp(min(val_loss, 50))})
            t_last = time.perf_counter()  # eval time is not training throughput

        if STEP_DELAY_S:
            time.sleep(STEP_DELAY_S)
        stop, time_due = preempt.poll()  # agreed across ranks
        ckpt.poll()  # commits a finished async save
        last = done == max_steps
        periodic = (cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0) or time_due
        if periodic or (last and cfg.checkpoint.save_final) or (stop and cfg.checkpoint.save_on_preempt):
            state = {"step": done, "tokens_seen": done * tokens_per_step, "val_loss": val_loss,
                     "data": reader.state_dict()}
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
        tracker.close()
        dist.barrier()
        return TrainResult(run_dir, done, val_loss, 0.0, last_ckpt, preempted=True)

    if cfg.train.sample_tokens and start_step < max_steps:
        text = sample_text(strategy, tokenizer, cfg, cfg.train.sample_prompt, cfg.train.sample_tokens)
        tracker.log("sample:\n" + text.strip("\n"))

    entropy = float(data.manifest["stats"]["val_unigram_entropy_nats"])
    if info.is_main:
        tracker.log(f"run dir:     {run_dir}")
        tracker.log(f"checkpoint:  {last_ckpt}")
        tracker.log(f"metrics:     {run_dir / 'metrics.jsonl'}  eval: {run_dir / 'eval.jsonl'}")
        if val_loss is not None:
            tracker.log(f"val loss {val_loss:.4f} nats vs unigram entropy {entropy:.4f} nats "
                        f"(gap {entropy - val_loss:.3f} nats)")
    tracker.close()
    dist.barrier()
    return TrainResult(run_dir, max_steps, val_loss, entropy, last_ckpt)


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


if __name__ == "__main__":
    sys.exit(main())

"""The tracker the training loop talks to: fans records out to files, console and W&B."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bigtrain.config import RunConfig
from bigtrain.tracking.console import Console
from bigtrain.tracking.jsonl import JsonlWriter


class Tracker:
    """``on_stop(why)``: called when a sweep's study prunes this run (a trial of ``bigtrain sweep``)."""

    def __init__(self, cfg: RunConfig, run_dir: Path, is_main: bool, start_step: int = 0,
                 on_stop: Callable[[str], None] | None = None):
        self.is_main = is_main
        self.console = Console(cfg.train.max_steps, start_step, cfg.tracking.console) if is_main else None
        self.metrics = self.evals = self.wandb = self.study = None
        self.on_stop = on_stop
        if not is_main:
            return
        from bigtrain.tracking.study import StudyTrial

        self.study = StudyTrial.from_env()
        self.metrics = JsonlWriter(run_dir / "metrics.jsonl")
        self.evals = JsonlWriter(run_dir / "eval.jsonl")
        # Records past the starting step belong to an abandoned timeline (a run that died after
        # its last checkpoint): drop them, the steps are redone.
        self.metrics.truncate_after(start_step)
        self.evals.truncate_after(start_step)
        if cfg.tracking.wandb.mode != "disabled":
            from bigtrain.tracking.wandb_run import WandbRun

            self.wandb = WandbRun(cfg.tracking.wandb, cfg.run.name, run_dir, cfg.to_dict(), log=self.log)

    def log(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)

    def log_metrics(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.metrics.write(record)
        self.console.metrics(record)
        if self.wandb:
            self.wandb.log({f"train/{k}": v for k, v in record.items() if k != "step"}, record["step"])

    def log_eval(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.evals.write(record)
        shown = " | ".join(f"{k} {v:.4f}" if k != "val_ppl" else f"{k} {v:.2f}" for k, v in record.items()
                           if k in ("val_loss", "val_ppl", "val_accuracy", "test_accuracy"))
        self.console.print(f"eval step {record['step']} | {shown}")
        if self.wandb:
            self.wandb.log({f"eval/{k}": v for k, v in record.items() if k != "step"}, record["step"])
        if self.study is not None:
            why = self.study.report(record)
            if why and self.on_stop is not None:
                self.on_stop(why)

    def close(self) -> None:
        if not self.is_main:
            return
        self.console.close()
        self.metrics.close()
        self.evals.close()
        if self.wandb:
            self.wandb.close()

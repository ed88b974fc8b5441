"""Console output: a rich progress bar on a TTY, plain log lines otherwise."""

from __future__ import annotations

import sys
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)


class Console:
    def __init__(self, total_steps: int, start_step: int, mode: str = "auto"):
        self.progress_bar = mode == "progress" or (mode == "auto" and sys.stdout.isatty())
        self._progress = None
        if self.progress_bar:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]}"),
                TimeRemainingColumn(), transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, loss="-", tps="-")

    def print(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def metrics(self, record: dict[str, Any]) -> None:
        rate = (f"{record['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in record
                else f"{record['samples_per_s']:,.1f} samples/s")
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], loss=f"{record['loss']:.4f}", tps=rate)
        else:
            self.print(
                f"step {record['step']:>6} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                f"grad_norm {record['grad_norm']:.3f} | {rate} | "
                f"mfu {record.get('mfu', 0) * 100:.1f}% | {record['elapsed_s']:.1f}s"
            )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

"""Preemption: SIGTERM / SIGUSR1 ask the run to checkpoint at the next step boundary and exit.

The handler only sets a flag. The training loop calls :meth:`Preemption.should_stop` once per
step; with several ranks the flags are combined with an all-reduce, so every rank stops at the
same step even if only one of them received the signal (SLURM signals the batch shell, torchrun
may signal only its children, a user may ``kill`` one PID). The process then exits with
``exit_codes.REQUEUE`` so the launcher (or SLURM's ``scontrol requeue``) starts it again, and the
run resumes from that checkpoint.
"""

from __future__ import annotations

import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    def __init__(self, device: torch.device, save_every_minutes: float = 0.0):
        self.device = device
        self.requested: Optional[str] = None
        self.save_every_s = save_every_minutes * 60.0
        self._last_save = time.monotonic()
        self._previous = {}
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def mark_saved(self) -> None:
        self._last_save = time.monotonic()

    def poll(self) -> tuple[bool, bool]:
        """(stop now, time-based save due), agreed by every rank.

        One process: plain Python, no device sync. Several ranks: a 2-int all-reduce per step
        (the price of every rank stopping at the same step).
        """
        stop = self.requested is not None
        due = self.save_every_s > 0 and time.monotonic() - self._last_save >= self.save_every_s
        if dist.is_initialized() and dist.get_world_size() > 1:
            flags = torch.tensor([stop, due], dtype=torch.int32, device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop, due = bool(flags[0]), bool(flags[1])
        if stop and self.requested is None:
            self.requested = "peer rank"
        return stop, due

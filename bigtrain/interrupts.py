"""Requests to stop a run at the next step boundary: preemption and Ctrl-C.

* SIGTERM / SIGUSR1 (SLURM's ``--signal``, ``scontrol requeue``, a cluster's preemption): save a
  checkpoint at the next step boundary and exit with ``exit_codes.REQUEUE`` (75), so the launcher
  or the sbatch script starts the run again and it resumes.
* SIGINT (Ctrl-C): the same save, then exit with ``exit_codes.INTERRUPTED`` (130). A second
  Ctrl-C exits at once, without a checkpoint.

The handlers only set flags. The loop polls once per step; with several ranks the flags are
combined with one all-reduce (on the compute device), so every rank stops at the same step even
if only one of them was signalled. The same all-reduce carries the checkpoint manager's "time-based
save due" flag, so ranks agree on it too.

A Python handler runs only when the main thread is between bytecodes, which it never is while it
waits in a collective that does not complete. So the signals are also written to a wakeup socket
(``signal.set_wakeup_fd``), and :meth:`StopRequests.requested_at` reads it from any thread: the
heartbeat watchdog uses it to end a rank that does not finish stopping in time
(:meth:`bigtrain.heartbeat.Heartbeat.watch_stop`).
"""

from __future__ import annotations

import os
import signal
import socket
import time

import torch
import torch.distributed as dist

from bigtrain.exit_codes import INTERRUPTED, PRUNED, REQUEUE

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    def __init__(self, device: torch.device):
        self.device = device
        self.preempted: str | None = None  # the signal's name, or "peer rank"
        self.interrupted: str | None = None
        self.pruned: str | None = None  # a sweep's study asked this trial to stop (why)
        self._previous = {}
        self._seen: dict[int, float] = {}  # signal number -> when it was first seen
        self._wakeup_read, self._wakeup_write = socket.socketpair()
        for end in (self._wakeup_read, self._wakeup_write):
            end.setblocking(False)
        self._previous_wakeup = signal.set_wakeup_fd(self._wakeup_write.fileno(), warn_on_full_buffer=False)
        for sig in (*PREEMPTION_SIGNALS, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self._seen.setdefault(signum, time.time())
        name = signal.Signals(signum).name
        if signum != signal.SIGINT:
            self.preempted = self.preempted or name
        elif self.interrupted:
            os.write(2, b"interrupted again: exiting now, without a checkpoint\n")
            os._exit(INTERRUPTED)
        else:
            self.interrupted = name

    def prune(self, why: str) -> None:
        """A sweep trial's study says stop (rank 0 knows; the next poll tells every rank)."""
        self.pruned = self.pruned or why

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._previous:
            signal.set_wakeup_fd(self._previous_wakeup)
            self._wakeup_read.close()
            self._wakeup_write.close()
        self._previous = {}

    def requested_at(self) -> tuple[float, int] | None:
        """(when, exit code) of the first stop signal, None before one came: also while the main
        thread is blocked, before its Python handler has run. Any thread may call it."""
        try:
            for signum in self._wakeup_read.recv(256):
                self._seen.setdefault(signum, time.time())
        except (BlockingIOError, OSError):  # nothing new, or closed by restore()
            pass
        seen = {s: t for s, t in dict(self._seen).items() if s in (*PREEMPTION_SIGNALS, signal.SIGINT)}
        if not seen:
            return None
        preempted = any(s in PREEMPTION_SIGNALS for s in seen)
        return min(seen.values()), REQUEUE if preempted else INTERRUPTED

    @property
    def requested(self) -> str | None:
        """Why the run stops (the signal's name, or the pruner's words), None if it was not asked to."""
        return self.preempted or self.interrupted or self.pruned

    @property
    def exit_code(self) -> int:
        """Preemption wins (a preempted job must be requeued), then Ctrl-C, then pruning."""
        return REQUEUE if self.preempted else INTERRUPTED if self.interrupted else PRUNED

    def poll(self, time_due: bool = False) -> tuple[bool, bool]:
        """(stop now, time-based save due), agreed by every rank.

        One process: plain Python, no device sync. Several ranks: one 4-int all-reduce per step
        (the price of every rank stopping at the same step).
        """
        if dist.is_initialized() and dist.get_world_size() > 1:
            flags = torch.tensor([self.preempted is not None, self.interrupted is not None, time_due,
                                  self.pruned is not None], dtype=torch.int32, device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            preempted, interrupted, due, pruned = flags.tolist()
            if preempted and not self.preempted:
                self.preempted = "peer rank"
            if interrupted and not self.interrupted:
                self.interrupted = "peer rank"
            if pruned and not self.pruned:
                self.pruned = "pruned by the study (rank 0)"
            time_due = bool(due)
        return self.requested is not None, time_due

"""Heartbeats and the hang watchdog: where every rank is, and a clear error instead of a silent hang.

Each rank keeps its position (step, phase) in memory; the loop moves it at every phase of a step
(``data``, ``forward-backward``, ``optimizer``, ``log``, ``eval``, ``stop-poll``, ``checkpoint``).
A watchdog thread writes it to ``RUN_DIR/heartbeat/rank-<R>.json`` about once a second (also
while the main thread is blocked in a collective) and, once the first step is done, watches it:
when one phase lasts longer than ``train.collective_timeout_s``, the rank writes every thread's
Python stack (and, on GPUs, NCCL's flight recorder) into ``RUN_DIR/hang/``, prints one line that
names the rank(s) that did not arrive (those behind the others in (step, phase), from their
heartbeats) and where the others wait, and exits with code 1 (torchrun then stops the rest).
``bigtrain status RUN_DIR`` reads the same files (:func:`read_heartbeats`, :func:`describe`).

After a stop signal (preemption, Ctrl-C) the watchdog also holds the rank to a deadline
(:meth:`Heartbeat.watch_stop`): a rank that has not saved and exited within it (the launcher kills
it a few seconds later) dumps its stacks the same way and exits with the stop's code, so a
preempted job is still requeued and resumes from its last committed checkpoint.

Torch-free (the launcher reads heartbeats on login nodes).
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PHASES = ("setup", "data", "forward-backward", "optimizer", "log", "eval", "stop-poll", "checkpoint", "done",
          "failed")
HANG_EXIT_CODE = 1


def heartbeat_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "heartbeat"


class Heartbeat:
    """This rank's position, and the watchdog thread that publishes and checks it."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, timeout_s: float, log: Callable[[str], None],
                 dump_collectives: Callable[[Path], None] | None = None, interval_s: float = 1.0):
        self.run_dir, self.rank, self.world_size = Path(run_dir), rank, world_size
        self.timeout_s, self.log, self.interval_s = timeout_s, log, interval_s
        self.dump_collectives = dump_collectives  # e.g. NCCL's flight recorder, on GPUs
        self.path = heartbeat_dir(run_dir) / f"rank-{rank}.json"
        self.step, self.phase = 0, "setup"
        self.since = time.time()  # when the current phase began
        self.armed = False  # the first step (compilation, warm-up) is not watched
        self.step_seconds: float | None = None  # the last step's duration
        self._step_began = self.since
        self._stop_requested: Callable[[], tuple[float, int] | None] | None = None
        self._stop_within_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="bigtrain-heartbeat", daemon=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread.start()

    def enter(self, phase: str, step: int | None = None) -> None:
        """The main thread moves on (cheap: two assignments and a clock read)."""
        now = time.time()
        if step is not None and step != self.step:
            if phase == "data" and self.step:
                self.step_seconds = now - self._step_began
                self.armed = True
            self._step_began = now
            self.step = step
        self.phase, self.since = phase, now

    def state(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "host": socket.gethostname(), "pid": os.getpid(),
                "step": self.step, "phase": self.phase, "since": self.since, "step_seconds": self.step_seconds,
                "written": time.time()}

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.state()))
            os.replace(tmp, self.path)
        except OSError:  # a full or read-only disk must not stop training
            pass

    def watch_stop(self, requested: Callable[[], tuple[float, int] | None], within_s: float) -> None:
        """Once ``requested()`` gives (when, exit code) of a stop signal, the rank has ``within_s``
        seconds to finish: save, tear down and exit. Past that it is treated as hung (stacks,
        one line) and exits with that code."""
        self._stop_requested, self._stop_within_s = requested, within_s

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write()
            now = time.time()
            if self.armed and self.timeout_s and now - self.since > self.timeout_s:
                self._hung(f"made no progress for {now - self.since:.0f}s (train.collective_timeout_s="
                           f"{self.timeout_s:g}) in step {self.step} ({self.phase})")
            stop = self._stop_requested() if self._stop_requested is not None else None
            if stop is not None and now - stop[0] > self._stop_within_s:
                self._hung(f"did not save and exit within {self._stop_within_s:g}s of its stop signal (set by "
                           f"resources.signal_grace_s); in step {self.step} ({self.phase}) for {now - self.since:.0f}s",
                           exit_code=stop[1])

    def _hung(self, what: str, exit_code: int = HANG_EXIT_CODE) -> None:
        """Dump stacks, name the laggards, exit (from the watchdog thread: the main one is stuck)."""
        hang = Path(self.run_dir) / "hang"
        try:
            hang.mkdir(parents=True, exist_ok=True)
            with open(hang / f"rank-{self.rank}-stacks.txt", "w") as fh:
                fh.write(f"rank {self.rank} (pid {os.getpid()} on {socket.gethostname()}): {what}\n")
                fh.flush()
                faulthandler.dump_traceback(fh, all_threads=True)
            if self.dump_collectives is not None:
                self.dump_collectives(hang)
        except Exception as err:  # the report matters more than the dump
            print(f"rank {self.rank}: could not write the hang dump ({err})", file=sys.stderr)
        beats = read_heartbeats(self.run_dir)
        line = f"error: hang: rank {self.rank} {what}; {laggards(beats, self.world_size)}; stacks in {hang}"
        # one write(2) of the whole line: every rank may report at once into the same pipe, and
        # print's separate writes of text and newline let the lines run into each other
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), (line + "\n").encode())
        os._exit(exit_code)

    def close(self, failed: bool = False) -> None:
        self.enter("failed" if failed else "done")
        self._stop.set()
        self._thread.join(timeout=5)
        self._write()


# -- reading (torch-free, also on login nodes) ----------------------------------------------


def read_heartbeats(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(heartbeat_dir(run_dir).glob("rank-*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda b: b["rank"])


def _position(beat: dict[str, Any]) -> tuple[int, int]:
    phase = beat.get("phase", "setup")
    return beat.get("step", 0), PHASES.index(phase) if phase in PHASES else 0


def laggards(beats: list[dict[str, Any]], world_size: int) -> str:
    """Which ranks did not arrive where the others wait, in words."""
    seen = {b["rank"] for b in beats}
    missing = sorted(set(range(world_size)) - seen)
    if not beats:
        return "no rank wrote a heartbeat"
    front = max(_position(b) for b in beats)
    behind = [b for b in beats if _position(b) < front]
    ahead = [b for b in beats if _position(b) == front]
    where = f"step {front[0]} ({PHASES[front[1]]})"
    now = time.time()
    parts = []
    if behind:
        names = ", ".join(f"rank {b['rank']} (at step {b['step']} {b['phase']} for {now - b['since']:.0f}s, "
                          f"{b['host']} pid {b['pid']})" for b in behind)
        parts.append(f"did not arrive: {names}; the others wait in {where}")
    else:
        parts.append(f"no rank is behind: all {len(ahead)} wait in {where} (a collective that never completes)")
    if missing:
        parts.append(f"no heartbeat from rank(s) {', '.join(map(str, missing))}")
    return "; ".join(parts)


def describe(beats: list[dict[str, Any]], stalled_after_s: float = 5.0) -> list[str]:
    """One line per rank for ``bigtrain status``: position, for how long, and STALLED or waiting
    when a rank stays behind the others longer than ``stalled_after_s`` (or 3 steps' time)."""
    if not beats:
        return []
    now = time.time()
    front = max(_position(b) for b in beats)
    lines = []
    for b in beats:
        age = now - b["since"]
        step_s = b.get("step_seconds") or 0.0
        slow = age > max(stalled_after_s, 3 * step_s)
        if b["phase"] in ("done", "failed"):
            flag = "finished" if b["phase"] == "done" else "failed"
        elif now - b.get("written", now) > max(10.0, 5 * stalled_after_s):
            flag = "GONE (no heartbeat written for a while)"
        elif _position(b) < front and slow:
            flag = "STALLED (behind the others)"
        elif slow:
            flag = "waiting"
        else:
            flag = "running"
        step_time = f", last step {step_s:.2f}s" if step_s else ""
        lines.append(f"rank {b['rank']}: step {b['step']} {b['phase']} for {age:.0f}s on {b['host']} pid {b['pid']}"
                     f"{step_time}  {flag}")
    return lines

"""torchrun, plus the exit code bigtrain's ranks returned: ``python -m launcher.agent [torchrun args]``.

This runs on the training nodes (never on a login node), once per node, in place of ``torchrun``:
it takes exactly torchrun's arguments and runs torchrun's elastic agent in this process. Two
differences, both needed for preemption and requeue:

* torchrun exits 1 whenever a worker fails, so the "requeue" code (75) a rank returns after
  saving a checkpoint would be lost. The agent exits with the workers' code instead (see
  :func:`combine_exit_codes`).
* SIGUSR1 (SLURM's ``--signal``) is handled like SIGTERM: the agent forwards it to every worker's
  process group, waits for them to checkpoint and exit, and does not restart them.
* SIGINT (Ctrl-C in the terminal of ``bigtrain train --nproc N``) is passed on to every worker
  (each runs in its own session, out of the terminal's reach): they save a checkpoint at the
  next step and exit 130, and so does the agent. A second Ctrl-C makes them exit at once.

It is the only launcher module that imports torch, and only inside :func:`main`.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Iterable

from bigtrain.exit_codes import BAD_INPUT, FAILED, OK, REQUEUE

HANDLED_SIGNALS = "SIGTERM,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"  # SIGINT: see _pass_on_interrupts


def combine_exit_codes(codes: Iterable[int | None], signum: int | None = None) -> int:
    """One exit code for a node from its workers' codes (negative: killed by that signal).

    75 when some rank saved and asked to be requeued and the others either did the same, finished,
    or were stopped by the agent; 2 when any rank reported bad input; otherwise the first failure.
    """
    codes = list(codes)
    known = [c for c in codes if c is not None]
    stopped = {-signal.SIGTERM, -signal.SIGKILL, -signal.SIGINT, -signal.SIGUSR1, -signal.SIGHUP}
    if BAD_INPUT in known:
        return BAD_INPUT
    if REQUEUE in known and all(c in (OK, REQUEUE) or c in stopped for c in known):
        return REQUEUE
    if known and len(known) == len(codes) and all(c == OK for c in known):
        return OK
    for code in known:
        if code > 0 and code != REQUEUE:
            return code
    for code in known:
        if code < 0:
            return 128 - code
    if REQUEUE in known:
        return REQUEUE
    return 128 + signum if signum else FAILED


def _with_signals(argv: list[str]) -> list[str]:
    """Make torchrun handle (and forward) SIGUSR1/2 too, unless the caller chose the signals."""
    names = {a.split("=", 1)[0] for a in argv}
    if names & {"--signals-to-handle", "--signals_to_handle"}:
        return list(argv)
    return [f"--signals-to-handle={HANDLED_SIGNALS}", *argv]


def _pass_on_interrupts(workers: list) -> None:
    """Ctrl-C reaches the agent only: hand it to every live worker's process group."""

    def forward(signum, _frame) -> None:
        for proc in workers:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass

    signal.signal(signal.SIGINT, forward)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.subprocess_handler import (
        subprocess_handler as sh,
    )

    # Remember the worker processes so their exit codes are known even when the agent is signalled.
    workers: list = []
    original_popen = sh.SubprocessHandler._popen

    def recording_popen(self, args, env, *rest, **kwargs):
        proc = original_popen(self, args, env, *rest, **kwargs)
        workers.append(proc)
        # One line per rank, so a job log shows which host runs which rank.
        node = os.environ.get("SLURMD_NODENAME")
        print(f"bigtrain agent: rank {env.get('RANK')}/{env.get('WORLD_SIZE')} (local {env.get('LOCAL_RANK')}) "
              f"on host {socket.gethostname()}" + (f" node {node}" if node else "") + f", pid {proc.pid}",
              file=sys.stderr, flush=True)
        return proc

    sh.SubprocessHandler._popen = recording_popen

    _pass_on_interrupts(workers)
    args = torchrun.parse_args(_with_signals(argv))
    nproc = max(1, int(args.nproc_per_node)) if str(args.nproc_per_node).isdigit() else 1
    try:
        torchrun.run(args)
        return OK
    except ChildFailedError as err:
        return combine_exit_codes([f.exitcode for f in err.failures.values()])
    except SignalException as err:
        latest = workers[-nproc:]
        code = combine_exit_codes([p.poll() for p in latest], int(err.sigval)) if latest else 128 + int(err.sigval)
        print(f"bigtrain agent: got {err.sigval.name}; workers exited {[p.returncode for p in latest]}; "
              f"exit code {code}", file=sys.stderr, flush=True)
        return code


if __name__ == "__main__":
    sys.exit(main())

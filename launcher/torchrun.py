"""Commands that start the ranks: torchrun (through :mod:`launcher.agent`) or the DeepSpeed launcher.

Pure functions returning argv lists; :class:`Shell` marks the few tokens that must be expanded
by the shell on each node (``$SLURM_NODEID`` …) — everything else is quoted by :func:`sh_join`.
No torch here.
"""

from __future__ import annotations

import shlex
import socket
from collections.abc import Iterable, Sequence
from typing import Union

from launcher.resources import Plan


class Shell(str):
    """A token passed to the shell as written (it expands variables); built only from constants."""


Token = Union[str, Shell]  # noqa: UP007 (a runtime alias)


def sh_join(tokens: Iterable[Token]) -> str:
    """Join argv for a shell line: every token quoted except :class:`Shell` tokens."""
    return " ".join(t if isinstance(t, Shell) else shlex.quote(str(t)) for t in tokens)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def rdzv_id_for(plan: Plan) -> str:
    return f"bigtrain-{plan.cfg.run.name}"


def training_entry(config: Token, overrides: Sequence[str]) -> list[Token]:
    """What every rank runs: ``-m bigtrain.train CONFIG [overrides]`` (after the launcher's options)."""
    return ["-m", "bigtrain.train", config, *overrides]


def torchrun_command(plan: Plan, python: str, config: Token, overrides: Sequence[str], *,
                     node_rank: Token, endpoint: Token, rdzv_id: Token,
                     shutdown_timeout: int | None = None) -> list[Token]:
    """torchrun with a c10d rendezvous at an explicit endpoint (needed for restarts to work)."""
    cmd: list[Token] = [
        python, "-m", "launcher.agent",
        f"--nnodes={plan.nodes}",
        f"--nproc-per-node={plan.procs_per_node}",
        _opt("--node-rank=", node_rank),
        "--rdzv-backend=c10d",
        _opt("--rdzv-endpoint=", endpoint),
        _opt("--rdzv-id=", rdzv_id),
        f"--max-restarts={plan.max_restarts}",
    ]
    if shutdown_timeout is not None:
        cmd.append(f"--shutdown-timeout={shutdown_timeout}")
    return cmd + training_entry(config, overrides)


def deepspeed_command(plan: Plan, python: str, config: Token, overrides: Sequence[str], *, hostfile: Token,
                      node_rank: Token, master_addr: Token, master_port: Token) -> list[Token]:
    """The DeepSpeed launcher, one per node, started without ssh (``--no_ssh --node_rank``)."""
    return [
        python, "-m", "deepspeed.launcher.runner",
        _opt("--hostfile=", hostfile),
        "--no_ssh",
        _opt("--node_rank=", node_rank),
        _opt("--master_addr=", master_addr),
        _opt("--master_port=", master_port),
        "--no_local_rank",
        "--module", "bigtrain.train", config, *overrides,
    ]


def hostfile_text(hosts: Sequence[str], slots: int) -> str:
    """MPI-style hostfile: with ``--no_ssh`` the names only label the nodes, in node-rank order."""
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def _opt(prefix: str, value: Token) -> Token:
    """``--flag=value``; stays a shell expression when the value is one (then the prefix is constant)."""
    if isinstance(value, Shell):
        return Shell(prefix + value)
    return f"{prefix}{value}"


def thread_env(plan: Plan) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(plan.threads), "MKL_NUM_THREADS": str(plan.threads)}

"""``bigtrain launch``: torchrun (c10d rendezvous) or the DeepSpeed launcher on this node. No torch.

One node: ``bigtrain launch CONFIG --nproc-per-node 2``. Several nodes: run the same command on
each with ``--nnodes N --node-rank R --rdzv-endpoint HOST:PORT`` (HOST is node 0, reachable from
all). The rendezvous is always c10d at an explicit endpoint: that is what lets ``--max-restarts``
restart failed workers (a static or ``--standalone`` rendezvous does not survive a restart).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from bigtrain.config import ConfigError
from launcher.plan import check_fits
from launcher.resources import (
    check_data_path,
    load_run_config,
    make_plan,
    normalize_overrides,
    parse_endpoint,
)
from launcher.torchrun import (
    deepspeed_command,
    free_port,
    hostfile_text,
    rdzv_id_for,
    sh_join,
    thread_env,
    torchrun_command,
)


def launch(config: str, overrides: list[str], *, nnodes: int | None = None, nproc_per_node: int | None = None,
           node_rank: int = 0, rdzv_endpoint: str | None = None, rdzv_id: str | None = None,
           max_restarts: int | None = None, hostfile: str | None = None, dry_run: bool = False,
           gpu_type: str | None = None, force: bool = False) -> int:
    overrides = normalize_overrides(list(overrides))
    cfg = load_run_config(config, overrides)
    plan = make_plan(cfg, nnodes, nproc_per_node, max_restarts)
    if not 0 <= node_rank < plan.nodes:
        raise ConfigError(f"--node-rank must be in 0..{plan.nodes - 1} (got {node_rank})")
    if rdzv_endpoint:
        host, port = parse_endpoint(rdzv_endpoint)
    elif plan.nodes > 1:
        raise ConfigError("--rdzv-endpoint HOST:PORT is required with --nnodes > 1 (node 0's address, the same on "
                          "every node)")
    else:
        host, port = "127.0.0.1", cfg.resources.rdzv_port or free_port()
    if rdzv_id is not None and (not rdzv_id or any(ch.isspace() for ch in rdzv_id)):
        raise ConfigError(f"--rdzv-id: expected one word (got {rdzv_id!r})")
    check_fits(cfg, world=plan.world_size, nodes=plan.nodes, gpu_type=gpu_type, force=force, launcher="launch")
    python = sys.executable
    env = {**thread_env(plan), **plan.env}
    notes = []

    if plan.launcher == "deepspeed":
        if hostfile:
            hostfile_path = Path(hostfile)
            if not hostfile_path.is_file():
                raise ConfigError(f"--hostfile: {hostfile} does not exist")
        else:
            hostfile_path = cfg.run_dir / f"hostfile-node{node_rank}"
            hosts = ["localhost"] if plan.nodes == 1 else [f"node{i}" for i in range(plan.nodes)]
            text = hostfile_text(hosts, plan.procs_per_node)
            notes.append(f"# hostfile {hostfile_path}: " + text.strip().replace("\n", "; "))
        cmd = deepspeed_command(plan, python, config, overrides, hostfile=str(hostfile_path),
                                node_rank=str(node_rank), master_addr=host, master_port=str(port))
    else:
        cmd = torchrun_command(plan, python, config, overrides, node_rank=str(node_rank), endpoint=f"{host}:{port}",
                               rdzv_id=rdzv_id or rdzv_id_for(plan), shutdown_timeout=cfg.resources.stop_grace_s)

    if dry_run:
        for note in notes:
            print(note)
        print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + sh_join(cmd))
        return 0

    check_data_path(cfg)
    # fail on bad data here, before any rank starts
    if node_rank == 0 and cfg.data.path is not None and cfg.packed_text:
        from bigtrain.data.prepare import prepare

        prepare(cfg.data)
    if plan.launcher == "deepspeed" and not hostfile:
        hostfile_path.parent.mkdir(parents=True, exist_ok=True)
        hostfile_path.write_text(text)
    sys.stdout.flush()
    os.execvpe(cmd[0], [str(t) for t in cmd], {**os.environ, **env})
    return 0  # not reached

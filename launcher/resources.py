"""Resolve a run config's ``resources`` (plus command-line options) into a launch plan. No torch.

Everything that can be checked before ranks start (or before cluster time is spent) is checked
here, and each problem is a one-line :class:`~bigtrain.config.ConfigError`.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bigtrain.config import ConfigError, RunConfig, load_config
from bigtrain.config.distill import check_teacher

OFFLINE_HINT_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE")


def normalize_overrides(overrides: list[str]) -> list[str]:
    """Keep ``resources.time=01:00:00`` a string: YAML would read it as the number 3600."""
    out = []
    for text in overrides:
        key, sep, value = text.partition("=")
        if sep and key.strip() == "resources.time" and value and value[0] not in "'\"":
            text = f"{key}='{value}'"
        out.append(text)
    return out


def load_run_config(config: str, overrides: list[str]) -> RunConfig:
    return load_config(config, normalize_overrides(overrides))


@dataclass
class Plan:
    """How many processes where, with how many threads each."""

    cfg: RunConfig
    nodes: int
    procs_per_node: int
    threads: int
    launcher: str = "torchrun"
    launch_mode: str = "torchrun"
    max_restarts: int = 0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


def threads_per_rank(cfg: RunConfig, procs_per_node: int, cpus: int | None = None) -> int:
    """train.threads, else resources.cpus_per_task, else an equal share of this machine's cores."""
    if cfg.train.threads:
        return cfg.train.threads
    if cfg.resources.cpus_per_task:
        return cfg.resources.cpus_per_task
    return max(1, (cpus or os.cpu_count() or 1) // procs_per_node)


def job_env(cfg: RunConfig) -> dict[str, str]:
    """``resources.env`` as strings (booleans as 1/0)."""
    out = {}
    for key, value in cfg.resources.env.items():
        out[key] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return out


def check_pretrained(cfg: RunConfig, base: Path | None = None) -> None:
    """model.pretrained, when set, is a Hugging Face model directory; distill.teacher a run directory
    or one."""
    if cfg.distill is not None:
        check_teacher(cfg.distill.teacher, base)
    if cfg.model.pretrained:
        pretrained = Path(os.path.expanduser(cfg.model.pretrained))
        if not pretrained.is_absolute() and base is not None:
            pretrained = base / pretrained
        if not (pretrained / "config.json").is_file():
            raise ConfigError(f"model.pretrained: {cfg.model.pretrained} is not a Hugging Face model directory "
                              f"(no config.json)")


def check_data_path(cfg: RunConfig, base: Path | None = None) -> None:
    """A missing data.path (that will not be downloaded) or model.pretrained directory is an error
    now, not on the compute node."""
    check_pretrained(cfg, base)
    if cfg.data.path is None or cfg.data.download:
        return
    paths = cfg.data.path if isinstance(cfg.data.path, list) else [cfg.data.path]
    checks = [("data.path", item) for item in paths]
    if cfg.data.val_path:
        checks.append(("data.val_path", cfg.data.val_path))
    for key, item in checks:
        path = Path(os.path.expanduser(item))
        if not path.is_absolute() and base is not None:
            path = base / path
        if glob.has_magic(str(path)):
            if not glob.glob(str(path), recursive=True):
                raise ConfigError(f"{key}: no files match {item}")
        elif not path.exists():
            raise ConfigError(f"{key}: {item} does not exist")
        elif not cfg.text_task and not (path / "train").is_dir():
            raise ConfigError(f"data.path: {item} has no train/ directory (an image set, or train/<class>/ "
                              f"folders of images; or set data.download)")


def make_plan(cfg: RunConfig, nodes: int | None = None, procs_per_node: int | None = None,
              max_restarts: int | None = None, cpus: int | None = None) -> Plan:
    """Validate and resolve; command-line values win over the config's ``resources``."""
    res = cfg.resources
    nodes = res.nodes if nodes is None else nodes
    nproc = res.procs_per_node if procs_per_node is None else procs_per_node
    if nodes < 1:
        raise ConfigError(f"--nnodes must be >= 1 (got {nodes})")
    if nproc < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1 (got {nproc})")
    world = nodes * nproc
    try:
        cfg.check_world_size(world)
    except ConfigError as err:
        per_rank, rem = divmod(cfg.train.global_batch_size, world)
        fits = [m for m in range(min(per_rank, cfg.train.micro_batch_size), 0,
                                 -1) if per_rank % m == 0] if not rem else []
        hint = f"; e.g. train.micro_batch_size={fits[0]}" if fits else ""
        raise ConfigError(f"{err}{hint}") from None
    if cfg.strategy.name == "single" and world > 1:
        raise ConfigError(f"strategy.name: 'single' runs one process, but the world size is {world} "
                          f"({nodes} node(s) x {nproc}); use ddp, fsdp or deepspeed")
    restarts = res.max_restarts if max_restarts is None else max_restarts
    if restarts < 0:
        raise ConfigError(f"--max-restarts must be >= 0 (got {restarts})")
    return Plan(cfg=cfg, nodes=nodes, procs_per_node=nproc, threads=threads_per_rank(cfg, nproc, cpus),
                launcher=res.launcher, launch_mode=res.launch_mode, max_restarts=restarts, env=job_env(cfg))


def python_for_jobs(cfg: RunConfig) -> str:
    """The interpreter compute nodes run: resources.python, else this one (shared filesystem)."""
    return cfg.resources.python or sys.executable


_ENDPOINT = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9._\-]+):(\d{1,5})$")


def parse_endpoint(text: str) -> tuple[str, int]:
    match = _ENDPOINT.match(text or "")
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(f"--rdzv-endpoint: expected HOST:PORT, e.g. node001:29500 (got {text!r})")
    return match.group(1), int(match.group(2))

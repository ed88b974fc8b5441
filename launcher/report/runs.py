"""Reading runs and sweeps for the report: metrics, evaluations, configs."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.report.values import config_differences, fmt
from launcher.sweep import SWEEP_FILE, read_jsonl

_TASK_DIR = re.compile(r"^sweep-(\d+)$")


class ReportError(Exception):
    """Bad input: one line for the user."""


@dataclass
class Run:
    path: Path
    metrics: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    config: dict[str, Any]  # flattened: dotted keys
    label: str = ""


@dataclass
class Trial:
    index: int
    setting: dict[str, Any]
    path: Path
    run: Run | None  # None: no metrics.jsonl yet


@dataclass
class Sweep:
    path: Path
    keys: list[str]
    trials: list[Trial] = field(default_factory=list)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (lists stay values)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _by_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step (the last one written), in step order."""
    steps = {r["step"]: r for r in records if isinstance(r.get("step"), int)}
    return [steps[s] for s in sorted(steps)]


def read_config(path: Path) -> dict[str, Any]:
    """``path/config.yaml`` flattened; {} without one."""
    if not (path / "config.yaml").is_file():
        return {}
    try:
        return flatten(yaml.safe_load((path / "config.yaml").read_text()) or {})
    except (yaml.YAMLError, AttributeError) as err:
        raise ReportError(f"{path / 'config.yaml'}: not a config ({' '.join(str(err).split())})") from None


def load_run(path: Path) -> Run:
    if not path.is_dir():
        raise ReportError(f"{path}: no such directory")
    if not (path / "metrics.jsonl").is_file():
        raise ReportError(f"{path}: no metrics.jsonl (not a run directory, or its run has not logged a step yet)")
    run = Run(path, _by_step(read_jsonl(path / "metrics.jsonl")), _by_step(read_jsonl(path / "eval.jsonl")),
              read_config(path))
    if not run.metrics:
        raise ReportError(f"{path / 'metrics.jsonl'}: no records")
    return run


def _task_dirs(path: Path) -> dict[int, Path]:
    return {int(m.group(1)): p for p in path.iterdir() if p.is_dir() and (m := _TASK_DIR.match(p.name))}


def is_sweep(path: Path) -> bool:
    return (path.is_dir() and not (path / "metrics.jsonl").is_file()
            and ((path / SWEEP_FILE).is_file() or bool(_task_dirs(path))))


def load_sweep(path: Path) -> Sweep:
    """The trials of ``path`` (``sweep.json`` when there, else its ``sweep-<i>/`` dirs, with the
    swept keys read off their configs)."""
    dirs = _task_dirs(path)
    if (path / SWEEP_FILE).is_file():
        record = json.loads((path / SWEEP_FILE).read_text())
        sweep = Sweep(path, list(record["keys"]))
        for task in record["tasks"]:
            i = task["index"]
            task_dir = dirs.get(i) or Path(task["run_dir"])  # a moved sweep keeps its sweep-<i>/ dirs
            sweep.trials.append(Trial(i, dict(task["setting"]), task_dir, _maybe_run(task_dir)))
    else:
        trials = [Trial(i, {}, d, _maybe_run(d)) for i, d in sorted(dirs.items())]
        configs = [t.run.config if t.run else read_config(t.path) for t in trials]
        keys = [k for k, _ in config_differences([Run(t.path, [], [], c) for t, c in zip(trials, configs) if c])]
        for t, config in zip(trials, configs):
            t.setting = {k: config[k] for k in keys if k in config}
        sweep = Sweep(path, keys, trials)
    if not any(t.run for t in sweep.trials):
        raise ReportError(f"{path}: none of its {len(sweep.trials)} sweep task(s) has a metrics.jsonl yet")
    return sweep


def _maybe_run(path: Path) -> Run | None:
    return load_run(path) if (path / "metrics.jsonl").is_file() else None


def _labels(paths: Sequence[Path]) -> list[str]:
    """The shortest path suffixes that tell the runs apart (``a``, ``b``; ``x/run``, ``y/run``)."""
    parts = [p.resolve().parts for p in paths]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def load(paths: Sequence[Path]) -> tuple[list[Run], list[Sweep]]:
    """Every run named (a sweep's trials with metrics among them), labelled, and the sweeps."""
    runs, sweeps, seen = [], [], set()
    for path in paths:
        if not path.is_dir():
            raise ReportError(f"{path}: no such directory")
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        if is_sweep(path):
            sweeps.append(load_sweep(path))
            runs += [t.run for t in sweeps[-1].trials if t.run]
        else:
            runs.append(load_run(path))
    for run, label in zip(runs, _labels([r.path for r in runs])):
        run.label = label
    for sweep in sweeps:
        for t in sweep.trials:
            if t.run and t.setting:
                t.run.label += " (" + ", ".join(f"{k}={fmt(v)}" for k, v in t.setting.items()) + ")"
    return runs, sweeps

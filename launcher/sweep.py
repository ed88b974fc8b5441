"""Sweeps: ``--sweep KEY=[v1,v2,...]`` (repeatable) becomes one SLURM job array; ``sweep-report``.

Grid mode takes the cartesian product (the first ``--sweep`` varies slowest). Random mode draws
``--trials`` settings; a parameter is a list (uniform choice) or ``uniform(a,b)``,
``loguniform(a,b)``, ``randint(a,b)`` (inclusive). Task ``i`` runs in ``RUN_DIR/sweep-<i>/`` with
``run.name=<name>-<i>``; ``RUN_DIR/sweep.json`` records every task's overrides. No torch.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bigtrain.config import ConfigError
from launcher.resources import Plan, load_run_config, make_plan

SWEEP_FILE = "sweep.json"
_DIST = re.compile(r"^(uniform|loguniform|randint|int)\(\s*([^,]+?)\s*,\s*([^,]+?)\s*\)$")


@dataclass(frozen=True)
class Param:
    key: str
    values: list[Any] | None = None  # a list to choose from
    dist: tuple[str, float, float] | None = None  # (kind, low, high) for random mode


def parse_sweep(text: str) -> Param:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")) or not re.match(r"^[A-Za-z0-9_.]+$", key):
        raise ConfigError(f"--sweep '{text}': expected KEY=[v1,v2,...], e.g. optim.lr=[1e-4,3e-4]")
    match = _DIST.match(raw.strip())
    if match:
        kind, low, high = match.group(1), _number(match.group(2), text), _number(match.group(3), text)
        kind = "randint" if kind == "int" else kind
        if not low < high or (kind == "loguniform" and low <= 0):
            raise ConfigError(f"--sweep '{text}': need 0 < low < high for loguniform, low < high otherwise")
        return Param(key, dist=(kind, low, high))
    try:
        values = yaml.safe_load(raw)
    except yaml.YAMLError:
        values = None
    if not isinstance(values, list) or not values:
        raise ConfigError(f"--sweep '{text}': the values must be a non-empty list like [1e-4,3e-4] "
                          "(or uniform(a,b), loguniform(a,b), randint(a,b) with --sweep-mode random)")
    return Param(key, values=[_numeric(v) for v in values])


def _numeric(value: Any) -> Any:
    """PyYAML (YAML 1.1) reads 1e-4 as a string; sweeps mean the number."""
    if isinstance(value, str) and re.match(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$", value.strip()):
        return float(value)
    return value


def _number(text: str, whole: str) -> float:
    try:
        return float(yaml.safe_load(text))
    except (TypeError, ValueError, yaml.YAMLError):
        raise ConfigError(f"--sweep '{whole}': {text!r} is not a number") from None


def _format(value: Any) -> str:
    """A value as an override's right-hand side that YAML reads back as the same value."""
    if isinstance(value, str):
        return value if yaml.safe_load(value) == value and "\n" not in value else json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)


def expand(params: Sequence[Param], mode: str = "grid", trials: int | None = None,
           seed: int = 0) -> list[dict[str, Any]]:
    """The settings, one dict ``{key: value}`` per task."""
    keys = [p.key for p in params]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--sweep: {next(k for k in keys if keys.count(k) > 1)} is swept twice")
    if mode == "grid":
        if trials is not None:
            raise ConfigError("--trials goes with --sweep-mode random")
        if any(p.values is None for p in params):
            bad = next(p for p in params if p.values is None)
            raise ConfigError(f"--sweep {bad.key}: a distribution needs --sweep-mode random (grid takes a list)")
        return [dict(zip(keys, combo)) for combo in itertools.product(*(p.values for p in params))]
    if mode != "random":
        raise ConfigError(f"--sweep-mode: expected grid or random (got {mode!r})")
    if not trials or trials < 1:
        raise ConfigError("--sweep-mode random needs --trials N (N >= 1)")
    rng = random.Random(seed)
    out = []
    for _ in range(trials):
        setting = {}
        for p in params:
            if p.values is not None:
                setting[p.key] = rng.choice(p.values)
            else:
                kind, low, high = p.dist
                if kind == "uniform":
                    setting[p.key] = rng.uniform(low, high)
                elif kind == "loguniform":
                    setting[p.key] = math.exp(rng.uniform(math.log(low), math.log(high)))
                else:
                    setting[p.key] = rng.randint(int(low), int(high))
        out.append(setting)
    return out


def task_overrides(setting: dict[str, Any], name: str, index: int, run_dir: Path) -> list[str]:
    return [*(f"{key}={_format(value)}" for key, value in setting.items()),
            f"run.name={name}-{index}", f"run.dir={run_dir}"]


def write_sweep_file(root: Path, record: dict[str, Any]) -> None:
    (root / SWEEP_FILE).write_text(json.dumps(record, indent=2) + "\n")


def array_tasks(config: str, overrides: list[str], plan: Plan, run_dir: Path, sweeps: Sequence[str],
                mode: str = "grid", trials: int | None = None,
                seed: int = 0) -> tuple[list[str], list[dict[str, Any]]]:
    """The tasks of one job array, one per setting of the ``--sweep`` options; ``([], [])`` without them.

    Task ``i`` is ``config`` with ``overrides``, its setting, ``run.name=<name>-<i>`` and
    ``run.dir=RUN_DIR/sweep-<i>``, validated, on ``plan``'s world size (the array shares its
    resources). Returns the swept keys and the tasks as ``{index, setting, overrides, run_dir, config}``.
    """
    if not (sweeps or trials is not None or mode != "grid"):
        return [], []
    if not sweeps:
        raise ConfigError("--sweep-mode/--trials need at least one --sweep KEY=[...]")
    params = [parse_sweep(text) for text in sweeps]
    for p in params:
        if p.key.startswith("resources.") or p.key.startswith("run."):
            raise ConfigError(f"--sweep {p.key}: one job array shares its resources and run directory; "
                              "sweep other keys")
    tasks = []
    for i, setting in enumerate(expand(params, mode, trials, seed)):
        task_dir = run_dir / f"sweep-{i}"
        task_over = task_overrides(setting, plan.cfg.run.name, i, task_dir)
        try:
            task_cfg = load_run_config(config, [*overrides, *task_over])
            task_plan = make_plan(task_cfg)
        except ConfigError as err:
            raise ConfigError(f"sweep task {i} ({', '.join(task_over[:-2])}): {err}") from None
        if task_plan.world_size != plan.world_size:
            raise ConfigError(f"sweep task {i}: world size differs from the array's")
        tasks.append({"index": i, "setting": setting, "overrides": task_over[:-2], "run_dir": str(task_dir),
                      "config": task_cfg})
    return [p.key for p in params], tasks


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def report_rows(root: Path) -> tuple[list[str], list[dict[str, Any]]]:
    path = Path(root) / SWEEP_FILE
    if not path.is_file():
        raise ConfigError(f"{root}: no {SWEEP_FILE} here (not a sweep submitted with `bigtrain submit --sweep`)")
    sweep = json.loads(path.read_text())
    keys = list(sweep["keys"])
    rows = []
    for task in sweep["tasks"]:
        run_dir = Path(task["run_dir"])
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        evals = read_jsonl(run_dir / "eval.jsonl")
        last = metrics[-1] if metrics else {}
        last_eval = evals[-1] if evals else {}
        rows.append({
            "task": task["index"],
            **{key: task["setting"].get(key) for key in keys},
            "state": task.get("state"),
            "step": last.get("step"),
            "loss": last.get("loss"),
            "val_loss": last_eval.get("val_loss"),
            "val_ppl": last_eval.get("val_ppl"),
            "tokens_per_s": last.get("tokens_per_s"),
            "run_dir": str(run_dir),
        })
    return keys, rows


def _cell(value: Any, column: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if column in ("loss", "val_loss"):
            return f"{value:.4f}"
        if column in ("val_ppl", "tokens_per_s"):
            return f"{value:.1f}"
        return f"{value:.6g}"
    return str(value)


def format_table(keys: list[str], rows: list[dict[str, Any]], sort_by: str | None = "val_loss") -> str:
    if sort_by:
        rows = sorted(rows, key=lambda r: (r.get(sort_by) is None, r.get(sort_by) if r.get(sort_by) is not None else 0,
                                           r["task"]))
    states = any(row.get("state") for row in rows)  # bigtrain sweep records each trial's state
    columns = ["task", *keys, *(["state"] if states else []), "step", "loss", "val_loss", "val_ppl", "tokens_per_s"]
    table = [columns] + [[_cell(row.get(c), c) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(root: Path, as_json: bool = False, sort_by: str = "val_loss") -> str:
    keys, rows = report_rows(root)
    if as_json:
        return json.dumps({"keys": keys, "rows": rows}, indent=2)
    done = sum(1 for r in rows if r["step"] is not None)
    return format_table(keys, rows, sort_by) + f"\n{done}/{len(rows)} task(s) have metrics; sorted by {sort_by}"


"""Sweeps on this machine, one trial after another: ``bigtrain sweep CONFIG --sweep KEY=SPACE ...``.

``--sweep-mode grid|random`` runs the settings ``bigtrain submit --sweep`` would put in a job array;
``bayes`` asks an Optuna study (TPE by default; ``--sampler gp|tpe|random``) for each trial's
parameters. The study lives in the sweep directory as ``RUN_DIR/study.journal``: Optuna's journal
file storage, which appends under a file lock, so trials on several nodes of a shared filesystem
can write it at once (SQLite's locking is unreliable on network filesystems). A trial trains in
``RUN_DIR/sweep-<n>/`` with the study named in its environment: at every evaluation it reports
``--metric`` and stops when the pruner (``--pruner median|asha|none``) says so, with exit code 77
(``exit_codes.PRUNED``, never requeued); its final value is told to the study. The search space
uses the grid/random syntax: ``[a,b,c]`` (a choice), ``uniform(a,b)``, ``loguniform(a,b)``,
``randint(a,b)`` or ``int(a,b)`` (inclusive). ``RUN_DIR/sweep.json`` lists every trial with its
state; ``bigtrain sweep-report`` and ``bigtrain report`` read it.

Imports optuna only for ``bayes`` (no torch: runs on login nodes too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bigtrain.config import ConfigError
from bigtrain.exit_codes import OK, PRUNED
from bigtrain.tracking.study import (
    ENV_METRIC,
    ENV_NAME,
    ENV_PRUNER,
    ENV_STUDY,
    ENV_TRIAL,
    STUDY_FILE,
    journal_storage,
    make_pruner,
)
from launcher.resources import load_run_config, make_plan
from launcher.sweep import SWEEP_FILE, Param, expand, parse_sweep, read_jsonl, task_overrides, write_sweep_file


def distributions(params: list[Param]) -> dict[str, Any]:
    """The search space as Optuna distributions."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for p in params:
        if p.values is not None:
            out[p.key] = CategoricalDistribution(p.values)
        else:
            kind, low, high = p.dist
            out[p.key] = (IntDistribution(int(low), int(high)) if kind == "randint"
                          else FloatDistribution(low, high, log=kind == "loguniform"))
    return out


def make_sampler(kind: str, seed: int):
    import optuna

    samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed, n_startup_trials=4),
                "gp": lambda: optuna.samplers.GPSampler(seed=seed, n_startup_trials=4),
                "random": lambda: optuna.samplers.RandomSampler(seed=seed)}
    if kind not in samplers:
        raise ConfigError(f"--sampler: expected tpe, gp or random (got {kind!r})")
    return samplers[kind]()


def open_study(run_dir: Path, name: str, owner: dict[str, Any], sampler, pruner, direction: str):
    """The sweep's study, created on first use; a study another sweep made is a one-line error (and
    the journal is left as it was)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = run_dir / STUDY_FILE
    storage = journal_storage(path)
    if path.is_file():
        existing = next((s for s in storage.get_all_studies() if s.study_name == name), None)
        saved = storage.get_study_user_attrs(existing._study_id).get("bigtrain") if existing else None
        if saved is not None and saved != owner:
            differs = sorted(k for k in set(saved) | set(owner) if saved.get(k) != owner.get(k))
            raise ConfigError(f"{path}: study '{name}' belongs to another sweep (its {', '.join(differs)} differ); "
                              f"use another run.dir or run.name")
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner, direction=direction,
                                load_if_exists=True)
    if study.user_attrs.get("bigtrain") is None:
        study.set_user_attr("bigtrain", owner)
    return study


def final_value(run_dir: Path, metric: str) -> float | None:
    evals = [e for e in read_jsonl(run_dir / "eval.jsonl") if e.get(metric) is not None]
    return float(evals[-1][metric]) if evals else None


def run_sweep(config: str, overrides: list[str], sweeps: list[str], mode: str = "bayes", trials: int | None = None,
              seed: int = 0, sampler: str = "tpe", pruner: str = "median", metric: str = "val_loss",
              direction: str = "minimize", log=print) -> int:
    """Run the trials one after another; returns 0 when at least one finished."""
    if not sweeps:
        raise ConfigError("bigtrain sweep: give at least one --sweep KEY=SPACE")
    params = [parse_sweep(text) for text in sweeps]
    if mode == "bayes" and (not trials or trials < 1):
        raise ConfigError("--sweep-mode bayes needs --trials N (N >= 1)")
    base = load_run_config(config, overrides)
    make_plan(base)  # the batch splits over the ranks, one-line errors before any trial runs
    root = base.run_dir
    root.mkdir(parents=True, exist_ok=True)
    record = {"keys": [p.key for p in params], "mode": mode, "metric": metric, "tasks": []}
    study = None
    if mode == "bayes":
        owner = {"config": str(Path(config).resolve()), "overrides": list(overrides), "space": list(sweeps),
                 "metric": metric, "direction": direction}
        try:
            pruning = make_pruner(pruner)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        study = open_study(root, base.run.name, owner, make_sampler(sampler, seed), pruning, direction)
        settings = [None] * trials
    else:
        settings = expand(params, mode, trials, seed)
    space = distributions(params) if study is not None else None
    for i, setting in enumerate(settings):
        trial = study.ask(space) if study is not None else None
        if trial is not None:
            setting = dict(trial.params)
        task_dir = root / f"sweep-{i}"
        task = {"index": i, "setting": setting, "run_dir": str(task_dir), "state": "running"}
        record["tasks"].append(task)
        write_sweep_file(root, record)
        env = dict(os.environ)
        if trial is not None:
            env.update({ENV_STUDY: str(root / STUDY_FILE), ENV_NAME: study.study_name, ENV_TRIAL: str(trial._trial_id),
                        ENV_METRIC: metric, ENV_PRUNER: pruner})
        argv = [sys.executable, "-m", "launcher.cli", "train", config, *overrides,
                *task_overrides(setting, base.run.name, i, task_dir)]
        shown = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())
        log(f"sweep: trial {i}: {shown}")
        code = subprocess.run(argv, env=env).returncode
        value = final_value(task_dir, metric)
        task["state"] = ("pruned" if code == PRUNED else "complete" if code == OK and value is not None
                         else f"failed (exit {code})")
        task[metric] = value
        if study is not None:
            from optuna.trial import TrialState

            if task["state"] == "pruned":
                study.tell(trial, state=TrialState.PRUNED)
            elif task["state"] == "complete":
                study.tell(trial, value)
            else:
                study.tell(trial, state=TrialState.FAIL)
        write_sweep_file(root, record)
        log(f"sweep: trial {i} {task['state']}" + (f", {metric} {value:.4f}" if value is not None else ""))
    done = [t for t in record["tasks"] if t["state"] == "complete"]
    if not done:
        log("sweep: no trial finished")
        return 1
    best = (min if direction == "minimize" else max)(done, key=lambda t: t[metric])
    pruned = sum(t["state"] == "pruned" for t in record["tasks"])
    log(f"sweep: best trial {best['index']} ({metric} {best[metric]:.4f}): "
        f"{json.dumps(best['setting'])}; {pruned} of {len(record['tasks'])} pruned; {root / SWEEP_FILE}")
    return 0

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

import contextlib
import fcntl
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from bigtrain.config import ConfigError
from bigtrain.exit_codes import BAD_INPUT, OK, PRUNED
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


def outcome(status: int, value: float | None) -> str:
    """A trial's state from its exit status and final metric."""
    if status == PRUNED:
        return "pruned"
    return "complete" if status == OK and value is not None else f"failed (exit {status})"


def tell(study, trial, state: str, value: float | None) -> None:
    """``trial``: an Optuna trial or its number."""
    from optuna.trial import TrialState

    kind = {"pruned": TrialState.PRUNED, "complete": TrialState.COMPLETE}.get(state, TrialState.FAIL)
    study.tell(trial, value if kind == TrialState.COMPLETE else None, state=kind)


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
        task["state"], task[metric] = outcome(code, value), value
        if study is not None:
            tell(study, trial, task["state"], value)
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


# ---------------------------------------------------------------------------------------------
# As a SLURM job array (bigtrain submit --sweep-mode bayes): each task asks the shared study
# ---------------------------------------------------------------------------------------------

ARRAY_FILE = "bayes.json"  # how the array's tasks ask the study: config, overrides, space, sampler, ...


@contextlib.contextmanager
def _locked(root: Path):
    """Tasks of one array update sweep.json one at a time."""
    with open(root / ".sweep.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _update_task(root: Path, index: int, **fields: Any) -> None:
    with _locked(root):
        record = json.loads((root / SWEEP_FILE).read_text())
        record["tasks"][index].update(fields)
        write_sweep_file(root, record)


def prepare_array(root: Path, config: str, overrides: list[str], sweeps: list[str], trials: int, seed: int,
                  sampler: str, pruner: str, metric: str, direction: str, name: str, job_id: str = "") -> list[str]:
    """At submit: create the study and the files the tasks read; returns the swept keys."""
    params = [parse_sweep(text) for text in sweeps]
    make_sampler(sampler, seed)
    try:
        pruning = make_pruner(pruner)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    owner = {"config": str(Path(config).resolve()), "overrides": list(overrides), "space": list(sweeps),
             "metric": metric, "direction": direction}
    open_study(root, name, owner, make_sampler(sampler, seed), pruning, direction)
    for i in range(trials):  # SLURM writes each task's log there from its start
        (root / f"sweep-{i}").mkdir(parents=True, exist_ok=True)
    (root / ARRAY_FILE).write_text(json.dumps({
        "config": str(Path(config).resolve()), "overrides": list(overrides), "sweeps": list(sweeps), "seed": seed,
        "sampler": sampler, "pruner": pruner, "metric": metric, "direction": direction, "name": name,
        "owner": owner}, indent=2) + "\n")
    write_sweep_file(root, {"job_id": job_id, "mode": "bayes", "keys": [p.key for p in params], "metric": metric,
                            "tasks": [{"index": i, "setting": {}, "run_dir": str(root / f"sweep-{i}"),
                                       "state": "pending"} for i in range(trials)]})
    return [p.key for p in params]


def record_job(root: Path, job_id: str) -> None:
    with _locked(root):
        record = json.loads((root / SWEEP_FILE).read_text())
        record["job_id"] = job_id
        write_sweep_file(root, record)


def _array_study(root: Path):
    spec = json.loads((root / ARRAY_FILE).read_text())
    study = open_study(root, spec["name"], spec["owner"], make_sampler(spec["sampler"], spec["seed"]),
                       make_pruner(spec["pruner"]), spec["direction"])
    return spec, study


def ask_task(root: Path, index: int) -> str:
    """In the job, before the step: this task's trial (asked once; a requeued task keeps it), its
    config snapshot, and the shell exports that name the study to the ranks."""
    from launcher.slurm.script import SNAPSHOT, snapshot_config

    spec, study = _array_study(root)
    task_dir = root / f"sweep-{index}"
    task_dir.mkdir(parents=True, exist_ok=True)
    trial_file = task_dir / "trial.json"
    if trial_file.is_file():
        trial = json.loads(trial_file.read_text())
    else:
        asked = study.ask(distributions([parse_sweep(t) for t in spec["sweeps"]]))
        trial = {"trial_id": asked._trial_id, "number": asked.number, "setting": dict(asked.params)}
        cfg = load_run_config(spec["config"], [*spec["overrides"],
                                               *task_overrides(trial["setting"], spec["name"], index, task_dir)])
        (task_dir / SNAPSHOT).write_text(snapshot_config(cfg, task_dir))
        trial_file.write_text(json.dumps(trial, indent=2) + "\n")
        _update_task(root, index, setting=trial["setting"], state="running", trial=trial["number"])
    env = {ENV_STUDY: str(root / STUDY_FILE), ENV_NAME: spec["name"], ENV_TRIAL: str(trial["trial_id"]),
           ENV_METRIC: spec["metric"], ENV_PRUNER: spec["pruner"]}
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())


def tell_task(root: Path, index: int, status: int) -> str:
    """In the job, after the step: the trial's outcome to the study and sweep.json."""
    spec, study = _array_study(root)
    task_dir = root / f"sweep-{index}"
    trial = json.loads((task_dir / "trial.json").read_text())
    value = final_value(task_dir, spec["metric"])
    state = outcome(status, value)
    tell(study, trial["number"], state, value)
    _update_task(root, index, state=state, **{spec["metric"]: value})
    return state


def main(argv: list[str] | None = None) -> int:
    """``python -m launcher.bayes ask|tell RUN_DIR TASK [STATUS]`` (the job script's two calls)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["ask"] and len(argv) == 3:
            print(ask_task(Path(argv[1]), int(argv[2])))
            return OK
        if argv[:1] == ["tell"] and len(argv) == 4:
            print(f"bigtrain: trial of task {argv[2]}: {tell_task(Path(argv[1]), int(argv[2]), int(argv[3]))}")
            return OK
    except (ConfigError, OSError, ValueError, KeyError) as err:
        print(f"error: bayes {' '.join(argv[:1])}: {err}", file=sys.stderr)
        return BAD_INPUT
    print("usage: python -m launcher.bayes ask RUN_DIR TASK | tell RUN_DIR TASK STATUS", file=sys.stderr)
    return BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

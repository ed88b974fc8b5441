"""``bigtrain submit CONFIG [overrides]``: check, snapshot the config, render, ``sbatch``, record.

The config is validated (and that nodes x procs_per_node divides the global batch) *before*
``sbatch`` runs; the resolved config is snapshotted into the run directory (a requeued job reads
exactly what was submitted, even if the YAML changed since); the rendered script is written
there too and submitted. ``RUN_DIR/slurm.json`` records the job for ``bigtrain status|logs|cancel``.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bigtrain.config import ConfigError
from launcher.plan import check_fits
from launcher.resources import (
    check_data_path,
    load_run_config,
    make_plan,
    normalize_overrides,
    python_for_jobs,
)
from launcher.slurm.monitor import follow
from launcher.slurm.records import RECORD, active_job, log_paths, write_record
from launcher.slurm.scheduler import sbatch, test_only, tool_path
from launcher.slurm.script import (
    SNAPSHOT,
    JobSpec,
    absolute_run_dir,
    render,
    resolve_template,
    snapshot_config,
)
from launcher.sweep import array_tasks, parse_sweep, write_sweep_file

SCRIPT = "job.sbatch"


def submit(config: str, overrides: list[str], *, template: str | None = None, dry_run: bool = False,
           follow_log: bool = False, sweeps: Sequence[str] = (), sweep_mode: str = "grid",
           trials: int | None = None, sweep_seed: int = 0, array_parallel: int | None = None,
           parsable: bool = False, gpu_type: str | None = None, force: bool = False, out=sys.stdout,
           sampler: str = "tpe", pruner: str = "median", metric: str = "val_loss", direction: str = "minimize") -> int:
    base = Path.cwd()
    overrides = normalize_overrides(list(overrides))
    cfg = load_run_config(config, overrides)
    plan = make_plan(cfg)
    check_data_path(cfg, base)
    template_path = resolve_template(cfg, template, base)
    run_dir = absolute_run_dir(cfg, base)
    python = python_for_jobs(cfg)

    bayes = sweep_mode == "bayes"
    if bayes:  # each task asks the study for its setting in the job: nothing to expand here
        if not sweeps or not trials or trials < 1:
            raise ConfigError("--sweep-mode bayes needs --sweep KEY=SPACE and --trials N (N >= 1)")
        [parse_sweep(text) for text in sweeps]  # one-line errors for a bad space, before anything runs
        keys, tasks = [], [{"index": i, "run_dir": str(run_dir / f"sweep-{i}"), "config": cfg, "overrides": []}
                           for i in range(trials)]
    else:
        keys, tasks = array_tasks(config, overrides, plan, run_dir, sweeps, sweep_mode, trials, sweep_seed)
    if tasks and array_parallel is not None and array_parallel < 1:
        raise ConfigError(f"--parallel must be >= 1 (got {array_parallel})")
    check_fits(cfg, world=plan.world_size, nodes=plan.nodes, gpu_type=gpu_type, force=force,
               variants=[(f"sweep task {t['index']}", t["config"]) for t in tasks])

    spec = JobSpec(plan=plan, run_dir=run_dir, submit_dir=base,
                   config_path=None if tasks else run_dir / SNAPSHOT,
                   array_size=len(tasks), array_parallel=array_parallel, template=template_path, python=python,
                   bayes=bayes)
    script_text = render(spec)
    script_path = run_dir / SCRIPT
    if dry_run:
        out.write(script_text)
        if tasks:
            print("# array tasks:", file=out)
            for task in tasks:
                print(f"#   {task['index']}: {task['run_dir']}  {' '.join(task['overrides'])}", file=out)
        print(f"# would write {script_path} and run: sbatch --parsable {shlex.quote(str(script_path))}", file=out)
        return 0

    tool_path("sbatch")  # fail before writing anything when there is no SLURM here
    test_only(script_text, base)  # partition, account, qos, constraint, node counts: asked of the cluster
    busy = active_job(run_dir)
    if busy:
        raise ConfigError(f"run dir {run_dir} already belongs to job {busy}, which is still queued or running "
                          "(bigtrain cancel it, or choose another run.dir)")
    run_dir.mkdir(parents=True, exist_ok=True)
    if bayes:
        from launcher.bayes import prepare_array

        keys = prepare_array(run_dir, config, overrides, list(sweeps), len(tasks), sweep_seed, sampler, pruner,
                             metric, direction, cfg.run.name)
    elif tasks:
        for task in tasks:
            task_dir = Path(task["run_dir"])
            task_dir.mkdir(parents=True, exist_ok=True)
            (task_dir / SNAPSHOT).write_text(snapshot_config(task["config"], task_dir))
    else:
        (run_dir / SNAPSHOT).write_text(snapshot_config(cfg, run_dir))
    script_path.write_text(script_text)
    script_path.chmod(0o755)
    job_id = sbatch(script_path, base)

    previous = []
    if (run_dir / RECORD).is_file():
        try:
            old = json.loads((run_dir / RECORD).read_text())
            previous = [*old.get("previous_jobs", []), old.get("job_id")]
        except ValueError:
            pass
    record = {
        "job_id": job_id, "name": cfg.run.name, "run_dir": str(run_dir), "script": str(script_path),
        "submit_dir": str(base), "config": str(Path(config).resolve()), "overrides": overrides,
        "nodes": plan.nodes, "procs_per_node": plan.procs_per_node, "launch_mode": plan.launch_mode,
        "launcher": plan.launcher, "max_steps": cfg.train.max_steps, "array_size": len(tasks),
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "previous_jobs": [j for j in previous if j],
    }
    write_record(run_dir, record)
    if bayes:
        from launcher.bayes import record_job

        record_job(run_dir, job_id)
    elif tasks:
        write_sweep_file(run_dir, {
            "job_id": job_id, "mode": sweep_mode, "keys": keys,
            "tasks": [{k: v for k, v in t.items() if k != "config"} for t in tasks],
        })
    if parsable:
        print(job_id, file=out, flush=True)
    else:
        what = f"array of {len(tasks)} tasks" if tasks else f"{plan.nodes} node(s) x {plan.procs_per_node} rank(s)"
        print(f"submitted job {job_id}: {cfg.run.name}, {what}, run dir {run_dir}", file=out)
        print(f"log: {log_paths(record)[0]}" + (" (one per task)" if tasks else ""), file=out, flush=True)
    if follow_log:
        return follow(record, out=out)
    return 0

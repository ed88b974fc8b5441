"""The job record ``RUN_DIR/slurm.json`` that ``bigtrain submit`` writes, and the log paths it implies."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from bigtrain.config import ConfigError
from launcher.slurm.scheduler import TERMINAL, job_records

RECORD = "slurm.json"


def read_record(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RECORD
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no {RECORD} here (not a directory `bigtrain submit` wrote)")
    return json.loads(path.read_text())


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    path = Path(run_dir) / RECORD
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def active_job(run_dir: Path) -> str | None:
    """The job id recorded in RUN_DIR if it is still pending or running."""
    path = Path(run_dir) / RECORD
    if not path.is_file() or not shutil.which("scontrol"):
        return None
    try:
        job_id = str(json.loads(path.read_text())["job_id"])
    except (ValueError, KeyError):
        return None
    for rec in job_records(job_id):
        if rec.get("JobState") not in TERMINAL:
            return job_id
    return None


def log_paths(record: dict[str, Any], task: int | None = None) -> list[Path]:
    """The job's log file(s): RUN_DIR/slurm-<id>.out, or each array task's sweep-<i>/slurm-<id>_<i>.out."""
    run_dir = Path(record["run_dir"])
    job_id = str(record["job_id"])
    if record.get("array_size"):
        tasks = range(record["array_size"]) if task is None else [task]
        return [run_dir / f"sweep-{i}" / f"slurm-{job_id}_{i}.out" for i in tasks]
    return [run_dir / f"slurm-{job_id}.out"]

"""``bigtrain status|logs|cancel RUN_DIR``: a submitted run's state and progress, its logs, cancelling it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from launcher.slurm.records import log_paths, read_record, write_record
from launcher.slurm.scheduler import TERMINAL, job_records, run_tool


def status(run_dir: Path, as_json: bool = False, out=sys.stdout) -> int:
    record = read_record(run_dir)
    job_id = str(record["job_id"])
    records = job_records(job_id, record.get("task_job_ids"))
    tasks = {r["ArrayTaskId"]: r["JobId"] for r in records if r.get("ArrayTaskId", "").isdigit()}
    if tasks and tasks != record.get("task_job_ids"):  # remembered for `sacct -c` once scontrol forgets
        record["task_job_ids"] = {**record.get("task_job_ids", {}), **tasks}
        try:
            write_record(run_dir, record)
        except OSError:
            pass
    rows = []
    for rec in records:
        rows.append({
            "job_id": rec.get("JobId", job_id),
            "task": rec.get("ArrayTaskId") or None,
            "state": rec.get("JobState", "UNKNOWN"),
            "exit_code": rec.get("ExitCode", ""),
            "restarts": int(rec["Restarts"]) if rec.get("Restarts", "").isdigit() else None,
            "nodes": rec.get("NodeList", ""),
            "elapsed": rec.get("RunTime", ""),
        })
    if not rows:
        rows.append({"job_id": job_id, "task": None, "state": "UNKNOWN", "exit_code": "", "restarts": None,
                     "nodes": "", "elapsed": "",
                     "note": "not known to scontrol, and sacct has no record (no accounting on this cluster?)"})
    progress = _progress(Path(record["run_dir"]), record)
    if as_json:
        print(json.dumps({"job_id": job_id, "name": record.get("name"), "run_dir": record["run_dir"], "jobs": rows,
                          "progress": progress}, indent=2), file=out)
        return 0
    print(f"run {record.get('name')}  job {job_id}  {record['run_dir']}", file=out)
    for row in rows:
        task = f" task {row['task']}" if row["task"] is not None else ""
        restarts = f"  restarts {row['restarts']}" if row["restarts"] is not None else ""
        print(f"  job {row['job_id']}{task}: {row['state']}  exit {row['exit_code']}{restarts}  "
              f"nodes {row['nodes'] or '-'}  elapsed "
              f"{row['elapsed'] or '-'}{'  (' + row['note'] + ')' if row.get('note') else ''}",
              file=out)
    for item in progress:
        if item.get("step") is not None:
            where = f" task {item['task']}" if item.get("task") is not None else ""
            val = f"  val_loss {item['val_loss']:.4f}" if item.get("val_loss") is not None else ""
            print(f"  progress{where}: step {item['step']}/{item['max_steps']}  loss {item['loss']:.4f}{val}", file=out)
    return 0


def _last_jsonl(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    last = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                last = json.loads(line)
            except ValueError:
                continue
    return last


def _progress(run_dir: Path, record: dict[str, Any]) -> list[dict[str, Any]]:
    dirs = ([(i, run_dir / f"sweep-{i}") for i in range(record["array_size"])] if record.get("array_size")
            else [(None, run_dir)])
    out = []
    for task, path in dirs:
        metrics = _last_jsonl(path / "metrics.jsonl")
        evals = _last_jsonl(path / "eval.jsonl")
        out.append({"task": task, "step": metrics.get("step") if metrics else None,
                    "loss": metrics.get("loss") if metrics else None,
                    "val_loss": evals.get("val_loss") if evals else None,
                    "max_steps": record.get("max_steps")})
    return out


def wait_states(job_id: str) -> list[str]:
    return [rec.get("JobState", "UNKNOWN") for rec in job_records(job_id)]


def follow(record: dict[str, Any], task: int | None = None, poll_s: float = 1.0, out=sys.stdout,
           timeout_s: float | None = None) -> int:
    """Print the log(s) as they grow until the job reaches a final state; 0 if it COMPLETED."""
    job_id = str(record["job_id"])
    offsets: dict[Path, int] = {}
    start = time.monotonic()
    unknown_since: float | None = None
    while True:
        states = wait_states(job_id)
        _print_new(log_paths(record, task), offsets, out, prefix=record.get("array_size") and task is None)
        done = bool(states) and all(s in TERMINAL for s in states)
        if not states:  # gone from scontrol and no accounting: treat as finished after a grace period
            unknown_since = unknown_since or time.monotonic()
            done = time.monotonic() - unknown_since > 10
        if done:
            time.sleep(poll_s)  # the last lines may land just after the state changes
            _print_new(log_paths(record, task), offsets, out, prefix=record.get("array_size") and task is None)
            print(f"bigtrain: job {job_id}: {', '.join(states) or 'finished'}", file=out, flush=True)
            return 0 if states and all(s == "COMPLETED" for s in states) else 1
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            print(f"bigtrain: stopped following job {job_id} after {timeout_s:.0f} s ({', '.join(states)})", file=out)
            return 1
        time.sleep(poll_s)


def _print_new(paths: list[Path], offsets: dict[Path, int], out, prefix: bool = False) -> None:
    for path in paths:
        if not path.is_file():
            continue
        with open(path, "rb") as fh:
            fh.seek(offsets.get(path, 0))
            data = fh.read()
        if not data:
            continue
        # only whole lines; keep a partial last line for the next round
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            continue
        offsets[path] = offsets.get(path, 0) + cut
        text = data[:cut].decode("utf-8", "replace")
        if prefix:
            text = "".join(f"[{path.parent.name}] {line}\n" for line in text.splitlines())
        out.write(text)
        out.flush()


def logs(run_dir: Path, follow_log: bool = False, task: int | None = None, out=sys.stdout) -> int:
    record = read_record(run_dir)
    if follow_log:
        return follow(record, task, out=out)
    found = False
    for path in log_paths(record, task):
        if path.is_file():
            found = True
            if record.get("array_size") and task is None:
                print(f"==> {path} <==", file=out)
            out.write(path.read_text(errors="replace"))
    if not found:
        print(f"no log yet for job {record['job_id']} (expected {log_paths(record, task)[0]})", file=sys.stderr)
    return 0


def cancel(run_dir: Path, out=sys.stdout) -> int:
    record = read_record(run_dir)
    job_id = str(record["job_id"])
    # The job script sees this mark and does not requeue (scancel's TERM looks like preemption).
    (Path(run_dir) / f".cancelled-{job_id}").touch()
    run_tool(["scancel", job_id])
    print(f"cancelled job {job_id} ({record.get('name')})", file=out)
    return 0

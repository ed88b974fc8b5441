"""Talking to SLURM: ``sbatch``, ``sbatch --test-only``, ``scontrol``, ``sacct``, ``scancel``.

A missing command or a failed call is a :class:`SlurmError` with a one-line message.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from bigtrain.config import ConfigError

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


class SlurmError(RuntimeError):
    """A SLURM command failed or is missing; ``str(err)`` is one line."""


def tool_path(name: str) -> str:
    """The path of SLURM command ``name``; SlurmError when it is not installed here."""
    path = shutil.which(name)
    if not path:
        raise SlurmError(f"{name}: command not found (run this on a SLURM login node, or use --dry-run)")
    return path


def run_tool(args: Sequence[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run([tool_path(args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        raise SlurmError(f"{shlex.join(args)} failed: {message[-1] if message else f'exit {proc.returncode}'}")
    return proc


def sbatch(script: Path, cwd: Path) -> str:
    proc = subprocess.run([tool_path("sbatch"), "--parsable", str(script)], capture_output=True, text=True, cwd=cwd,
                          timeout=120)
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        raise SlurmError(f"sbatch rejected the job: {message[-1] if message else f'exit {proc.returncode}'}")
    return proc.stdout.strip().split(";")[0]


def test_only(script_text: str, cwd: Path) -> None:
    """``sbatch --test-only``: the controller checks the request (nothing is submitted)."""
    proc = subprocess.run([tool_path("sbatch"), "--test-only"], input=script_text, capture_output=True, text=True,
                          cwd=cwd, timeout=120)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        first = next((ln for ln in lines if ln.startswith("sbatch: error:")), lines[0] if lines else "")
        reason = first.replace("sbatch: error: ", "")
        detail = next((ln for ln in lines if ln.startswith("allocation failure:")), "")
        if detail and detail not in reason:
            reason = f"{reason} ({detail})" if reason != detail else reason
        raise ConfigError(f"the cluster rejects this job: {reason or f'sbatch --test-only exit {proc.returncode}'}")


def _parse_scontrol(text: str) -> list[dict[str, str]]:
    records = []
    for line in text.splitlines():
        if "JobId=" not in line:
            continue
        records.append({k: v for k, v in re.findall(r"(?:^|\s)([A-Za-z/:_]+)=(\S*)", line)})
    return records


def job_records(job_id: str, task_job_ids: dict[str, str] | None = None) -> list[dict[str, str]]:
    """One dict per job (per array task): JobId, ArrayTaskId, JobState, ExitCode, Restarts, NodeList, RunTime.

    ``scontrol show job`` knows queued, running and recently finished jobs; then ``sacct`` (a
    cluster with accounting), then ``sacct -c`` (job-completion log only; array tasks are found by
    the per-task job ids ``status`` remembered while scontrol still knew them).
    """
    proc = run_tool(["scontrol", "show", "job", "-o", str(job_id)], check=False)
    records = _parse_scontrol(proc.stdout) if proc.returncode == 0 else []
    if records:
        return sorted(records, key=lambda r: _task_key(r.get("ArrayTaskId", "")))
    if not shutil.which("sacct"):
        return []
    fields = ["-n", "-P", "-o", "JobID,JobName,State,ExitCode,Elapsed,NodeList"]
    task_of = {jid: task for task, jid in (task_job_ids or {}).items()}
    for args in (["sacct", "-X", "-j", str(job_id)],
                 ["sacct", "-c", "-j", ",".join([str(job_id), *task_of])]):
        proc = run_tool([*args, *fields], check=False)
        out = []
        for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
            parts = line.split("|")
            if len(parts) < 6 or "." in parts[0]:
                continue
            jid, name, state, code, elapsed, nodes = parts[:6]
            task = jid.split("_", 1)[1] if "_" in jid else task_of.get(jid, "")
            out.append({"JobId": jid, "JobName": name, "JobState": state.split()[0] if state else "UNKNOWN",
                        "ExitCode": code, "RunTime": elapsed, "NodeList": nodes, "ArrayTaskId": task, "Restarts": ""})
        if out:
            return sorted(out, key=lambda r: _task_key(r.get("ArrayTaskId", "")))
    return []


def _task_key(task: str) -> tuple[int, str]:
    return (int(task), "") if task.isdigit() else (1 << 30, task)

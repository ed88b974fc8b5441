"""SLURM: render the sbatch script, submit it, and ask about submitted runs (status, logs, cancel).

``bigtrain submit CONFIG [overrides]`` validates the config (and that nodes x procs_per_node
divides the global batch) *before* calling ``sbatch``; snapshots the resolved config into the
run directory (a requeued job reads exactly what was submitted, even if the YAML changed since);
renders ``slurm/bigtrain.sbatch`` (or ``resources.template`` / ``--template``); writes the script
into the run directory and submits it. ``RUN_DIR/slurm.json`` records the job for ``bigtrain
status|logs|cancel RUN_DIR``.

Templates are plain text with ``{{name}}`` placeholders (see :data:`PLACEHOLDERS`). Every value
that reaches the shell is quoted with :func:`shlex.quote`; the only unquoted shell text is
constant (``$SLURM_NODEID`` and such). No torch here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from bigtrain.config import ConfigError, RunConfig
from bigtrain.exit_codes import REQUEUE
from launcher.resources import Plan, python_for_jobs
from launcher.torchrun import Shell, deepspeed_command, sh_join, torchrun_command

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEMPLATE = ROOT / "slurm" / "bigtrain.sbatch"
RECORD = "slurm.json"
SCRIPT = "job.sbatch"
SNAPSHOT = "submit-config.yaml"

PLACEHOLDERS = {
    "directives": "the #SBATCH lines",
    "template": "the template's path",
    "summary": "one line: world size, nodes, launch mode",
    "submit_dir": "the directory `bigtrain submit` ran in (quoted)",
    "exports": "export lines: threads, resources.env, BIGTRAIN_RUN_DIR, BIGTRAIN_CONFIG",
    "task_setup": "array jobs: the task's run directory and config",
    "rdzv_port": "the rendezvous / MASTER_PORT (a number or a shell expression)",
    "pre_step": "commands before the step (the DeepSpeed hostfile)",
    "step_command": "the srun line that starts the ranks (required)",
    "signal_grace_s": "seconds of warning before the time limit",
    "requeue_code": f"the runtime's requeue exit code ({REQUEUE})",
    "max_requeues": "resources.max_requeues",
    "python": "the interpreter on compute nodes (quoted)",
    "run_dir": "the run directory (quoted; the sweep root for arrays)",
    "job_name": "the job name",
    "nodes": "resources.nodes",
    "procs_per_node": "resources.procs_per_node",
    "world_size": "nodes x procs_per_node",
}
REQUIRED = ("step_command",)
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


class SlurmError(RuntimeError):
    """A SLURM command failed or is missing; ``str(err)`` is one line."""


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


@dataclass
class JobSpec:
    """Everything the script needs besides the plan. Paths are absolute."""

    plan: Plan
    run_dir: Path  # the run's directory; for an array, the sweep root
    submit_dir: Path
    config_path: Optional[Path] = None  # the config snapshot (single job)
    array_size: int = 0  # > 0: a job array; task i runs RUN_DIR/sweep-<i>/submit-config.yaml
    array_parallel: Optional[int] = None  # at most this many tasks at once
    template: Path = DEFAULT_TEMPLATE
    python: str = sys.executable
    extra_directives: list[str] = field(default_factory=list)

    @property
    def is_array(self) -> bool:
        return self.array_size > 0


def _sbatch_path(directory: Path, pattern: str, what: str) -> str:
    """DIRECTORY/PATTERN for an #SBATCH line: sbatch splits those on whitespace and expands %-patterns
    (so a literal % in the directory is doubled; PATTERN keeps its %j, %A, %a)."""
    text = str(directory)
    if any(ch in text for ch in "\"\n\r\\"):
        raise ConfigError(f"{what}: {text!r} holds a character an #SBATCH line cannot carry (quote, backslash or newline)")
    text = text.replace("%", "%%") + "/" + pattern
    return f'"{text}"' if any(ch.isspace() or ch == "'" for ch in text) else text


def job_name(cfg: RunConfig) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", cfg.run.name)[:64] or "bigtrain"


def directives(spec: JobSpec) -> list[str]:
    plan, res = spec.plan, spec.plan.cfg.resources
    tasks_per_node = plan.procs_per_node if plan.launch_mode == "srun" else 1
    lines = [
        f"--job-name={job_name(plan.cfg)}",
        f"--nodes={plan.nodes}",
        f"--ntasks-per-node={tasks_per_node}",
    ]
    if plan.launch_mode == "torchrun":  # one task per node holds all its ranks: at least a CPU each
        lines.append(f"--cpus-per-task={(res.cpus_per_task or 1) * plan.procs_per_node}")
    elif res.cpus_per_task:
        lines.append(f"--cpus-per-task={res.cpus_per_task}")
    if res.gpus_requested:
        lines.append(f"--gpus-per-node={res.gpus_requested}")
    if res.mem:
        lines.append(f"--mem={res.mem}")
    if res.time:
        lines.append(f"--time={res.time}")
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(res, key)
        if value:
            lines.append(f"--{key}={value}")
    if res.exclusive:
        lines.append("--exclusive")
    if spec.is_array:
        limit = f"%{spec.array_parallel}" if spec.array_parallel else ""
        lines.append(f"--array=0-{spec.array_size - 1}{limit}")
        lines.append(f"--output={_sbatch_path(spec.run_dir, 'sweep-%a/slurm-%A_%a.out', 'run.dir')}")
    else:
        lines.append(f"--output={_sbatch_path(spec.run_dir, 'slurm-%j.out', 'run.dir')}")
    lines.append("--open-mode=append")  # a requeued job appends to the same log
    lines.append("--requeue")
    if res.signal_grace_s:
        lines.append(f"--signal=B:USR1@{res.signal_grace_s}")
    for extra in [*res.sbatch_extra, *spec.extra_directives]:
        extra = extra.strip()
        if extra.startswith("#SBATCH"):
            extra = extra[len("#SBATCH"):].strip()
        lines.append(extra)
    return [f"#SBATCH {line}" for line in lines]


def step_command(spec: JobSpec) -> str:
    """The srun line that starts the ranks (torchrun per node, DeepSpeed per node, or one task per rank)."""
    plan = spec.plan
    res = plan.cfg.resources
    config = Shell('"$BIGTRAIN_CONFIG"')
    srun: list[Any] = ["srun", f"--nodes={plan.nodes}"]
    where = 'echo "bigtrain: node ${SLURM_NODEID} task ${SLURM_PROCID} on host $(hostname) (${SLURMD_NODENAME:-?})"'
    if plan.launch_mode == "srun":
        srun += [f"--ntasks={plan.world_size}", f"--ntasks-per-node={plan.procs_per_node}"]
        if res.cpus_per_task:
            srun.append(f"--cpus-per-task={res.cpus_per_task}")
        inner = f'{where}; exec "$0" "$@"'
        rank_cmd: list[Any] = [spec.python, "-m", "bigtrain.train", config]
    else:
        srun += [f"--ntasks={plan.nodes}", "--ntasks-per-node=1"]
        if res.cpus_per_task:
            srun.append(f"--cpus-per-task={res.cpus_per_task * plan.procs_per_node}")
        else:  # all the CPUs the job got on the node (more than one per rank with --exclusive)
            srun.append(Shell('--cpus-per-task="${SLURM_CPUS_ON_NODE:-1}"'))
        # PYTHON -m MODULE [--node-rank=$SLURM_NODEID] ARGS: the node rank is expanded by each task's shell.
        if plan.launcher == "deepspeed":
            full = deepspeed_command(plan, spec.python, config, [], hostfile=Shell('"$BIGTRAIN_HOSTFILE"'),
                                     node_rank="0", master_addr=Shell('"$MASTER_ADDR"'),
                                     master_port=Shell('"$MASTER_PORT"'))
            rank_cmd = [t for t in full if not str(t).startswith("--node_rank=")]
            # The DeepSpeed launcher dies on SIGUSR1: it ignores it (the ranks install their own handler).
            inner = f'{where}; trap "" USR1; exec "$0" "$1" "$2" --node_rank="$SLURM_NODEID" "${{@:3}}"'
        else:
            full = torchrun_command(plan, spec.python, config, [], node_rank="0",
                                    endpoint=Shell('"$MASTER_ADDR:$MASTER_PORT"'),
                                    rdzv_id=Shell('"bigtrain-$SLURM_JOB_ID"'),
                                    shutdown_timeout=max(30, res.signal_grace_s))
            rank_cmd = [t for t in full if not str(t).startswith("--node-rank=")]
            inner = f'{where}; exec "$0" "$1" "$2" --node-rank="$SLURM_NODEID" "${{@:3}}"'
    srun += ["--label", "--kill-on-bad-exit=0"]
    return sh_join(srun) + " \\\n    bash -c " + shlex.quote(inner) + " \\\n    " + sh_join(rank_cmd)


def explicit_threads(plan: Plan) -> bool:
    return bool(plan.cfg.train.threads or plan.cfg.resources.cpus_per_task)


def exports(spec: JobSpec) -> str:
    plan = spec.plan
    lines = []
    if explicit_threads(plan):
        lines.append(f"export OMP_NUM_THREADS={plan.threads} MKL_NUM_THREADS={plan.threads}")
    else:  # an equal share of the CPUs SLURM allocated on the node, known only in the job
        lines.append(f"THREADS=$(( ${{SLURM_CPUS_ON_NODE:-1}} / {plan.procs_per_node} )); "
                     '[ "$THREADS" -ge 1 ] || THREADS=1')
        lines.append('export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"')
    lines += [f"export {key}={shlex.quote(value)}" for key, value in plan.env.items()]
    if spec.is_array:
        root = shlex.quote(str(spec.run_dir))
        lines.append(f'export BIGTRAIN_RUN_DIR={root}/sweep-"${{SLURM_ARRAY_TASK_ID}}"')
        lines.append(f'export BIGTRAIN_CONFIG="$BIGTRAIN_RUN_DIR"/{SNAPSHOT}')
    else:
        lines.append(f"export BIGTRAIN_RUN_DIR={shlex.quote(str(spec.run_dir))}")
        lines.append(f"export BIGTRAIN_CONFIG={shlex.quote(str(spec.config_path))}")
    return "\n".join(lines)


def render(spec: JobSpec, template_text: Optional[str] = None) -> str:
    plan, res = spec.plan, spec.plan.cfg.resources
    text = spec.template.read_text() if template_text is None else template_text
    used = set(re.findall(r"\{\{\s*([A-Za-z_]+)\s*\}\}", text))
    unknown = sorted(used - set(PLACEHOLDERS))
    if unknown:
        raise ConfigError(f"template {spec.template}: unknown placeholder {{{{{unknown[0]}}}}} "
                          f"(known: {', '.join(sorted(PLACEHOLDERS))})")
    missing = [name for name in REQUIRED if name not in used]
    if missing:
        raise ConfigError(f"template {spec.template}: must contain {{{{{missing[0]}}}}} (the line that starts the ranks)")
    mode = f"{plan.launcher} per node" if plan.launch_mode == "torchrun" else "srun, one task per rank"
    pre_step = ""
    if plan.launch_mode == "torchrun" and plan.launcher == "deepspeed":
        pre_step = ('export BIGTRAIN_HOSTFILE="$BIGTRAIN_RUN_DIR/hostfile-$SLURM_JOB_ID"\n'
                    f'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\\$/ slots={plan.procs_per_node}/" '
                    '> "$BIGTRAIN_HOSTFILE"')
    task_setup = ""
    if spec.is_array:
        task_setup = ('echo "bigtrain: array task ${SLURM_ARRAY_TASK_ID} of job ${SLURM_ARRAY_JOB_ID}: '
                      'run dir ${BIGTRAIN_RUN_DIR}"')
    port = str(res.rdzv_port) if res.rdzv_port else "$((20000 + SLURM_JOB_ID % 20000))"
    values = {
        "directives": "\n".join(directives(spec)),
        "template": str(spec.template),
        "summary": f"{plan.world_size} rank(s): {plan.nodes} node(s) x {plan.procs_per_node}, {mode}, "
                   + (f"{plan.threads} thread(s) per rank" if explicit_threads(plan)
                    else "threads per rank: the node's allocated CPUs / ranks per node"),
        "submit_dir": shlex.quote(str(spec.submit_dir)),
        "exports": exports(spec),
        "task_setup": task_setup,
        "rdzv_port": port,
        "pre_step": pre_step,
        "step_command": step_command(spec),
        "signal_grace_s": str(res.signal_grace_s),
        "requeue_code": str(REQUEUE),
        "max_requeues": str(res.max_requeues),
        "python": shlex.quote(spec.python),
        "run_dir": shlex.quote(str(spec.run_dir)),
        "job_name": job_name(plan.cfg),
        "nodes": str(plan.nodes),
        "procs_per_node": str(plan.procs_per_node),
        "world_size": str(plan.world_size),
    }
    return re.sub(r"\{\{\s*([A-Za-z_]+)\s*\}\}", lambda m: values[m.group(1)], text)


def resolve_template(cfg: RunConfig, override: Optional[str], base: Path) -> Path:
    name = override or cfg.resources.template
    if not name:
        return DEFAULT_TEMPLATE
    path = Path(os.path.expanduser(name))
    if not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise ConfigError(f"resources.template: {name} does not exist")
    return path.resolve()


def absolute_run_dir(cfg: RunConfig, base: Path) -> Path:
    run_dir = Path(os.path.expanduser(str(cfg.run_dir)))
    return run_dir if run_dir.is_absolute() else (base / run_dir)


def snapshot_config(cfg: RunConfig, run_dir: Path) -> str:
    """The resolved config with an absolute run.dir: what the job (and every requeue of it) runs."""
    import yaml

    tree = cfg.to_dict()
    tree["run"]["dir"] = str(run_dir)
    return "# written by `bigtrain submit`: the resolved config this job runs\n" + yaml.safe_dump(tree, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Talking to SLURM
# ---------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise SlurmError(f"{name}: command not found (run this on a SLURM login node, or use --dry-run)")
    return path


def run_tool(args: Sequence[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run([_tool(args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        raise SlurmError(f"{shlex.join(args)} failed: {message[-1] if message else f'exit {proc.returncode}'}")
    return proc


def sbatch(script: Path, cwd: Path) -> str:
    proc = subprocess.run([_tool("sbatch"), "--parsable", str(script)], capture_output=True, text=True, cwd=cwd,
                          timeout=120)
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip().splitlines()
        raise SlurmError(f"sbatch rejected the job: {message[-1] if message else f'exit {proc.returncode}'}")
    return proc.stdout.strip().split(";")[0]


def test_only(script_text: str, cwd: Path) -> None:
    """``sbatch --test-only``: the controller checks the request (nothing is submitted)."""
    proc = subprocess.run([_tool("sbatch"), "--test-only"], input=script_text, capture_output=True, text=True,
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


def job_records(job_id: str, task_job_ids: Optional[dict[str, str]] = None) -> list[dict[str, str]]:
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


# ---------------------------------------------------------------------------------------------
# Run records
# ---------------------------------------------------------------------------------------------


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


def active_job(run_dir: Path) -> Optional[str]:
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


def log_paths(record: dict[str, Any], task: Optional[int] = None) -> list[Path]:
    """The job's log file(s): RUN_DIR/slurm-<id>.out, or each array task's sweep-<i>/slurm-<id>_<i>.out."""
    run_dir = Path(record["run_dir"])
    job_id = str(record["job_id"])
    if record.get("array_size"):
        tasks = range(record["array_size"]) if task is None else [task]
        return [run_dir / f"sweep-{i}" / f"slurm-{job_id}_{i}.out" for i in tasks]
    return [run_dir / f"slurm-{job_id}.out"]


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


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
              f"nodes {row['nodes'] or '-'}  elapsed {row['elapsed'] or '-'}{'  (' + row['note'] + ')' if row.get('note') else ''}",
              file=out)
    for item in progress:
        if item.get("step") is not None:
            where = f" task {item['task']}" if item.get("task") is not None else ""
            val = f"  val_loss {item['val_loss']:.4f}" if item.get("val_loss") is not None else ""
            print(f"  progress{where}: step {item['step']}/{item['max_steps']}  loss {item['loss']:.4f}{val}", file=out)
    return 0


def _last_jsonl(path: Path) -> Optional[dict[str, Any]]:
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


def follow(record: dict[str, Any], task: Optional[int] = None, poll_s: float = 1.0, out=sys.stdout,
           timeout_s: Optional[float] = None) -> int:
    """Print the log(s) as they grow until the job reaches a final state; 0 if it COMPLETED."""
    job_id = str(record["job_id"])
    offsets: dict[Path, int] = {}
    start = time.monotonic()
    unknown_since: Optional[float] = None
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


def logs(run_dir: Path, follow_log: bool = False, task: Optional[int] = None, out=sys.stdout) -> int:
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


# ---------------------------------------------------------------------------------------------
# Submit
# ---------------------------------------------------------------------------------------------


def submit(config: str, overrides: list[str], *, template: Optional[str] = None, dry_run: bool = False,
           follow_log: bool = False, sweeps: Sequence[str] = (), sweep_mode: str = "grid",
           trials: Optional[int] = None, sweep_seed: int = 0, array_parallel: Optional[int] = None,
           parsable: bool = False, out=sys.stdout) -> int:
    from launcher import sweep as sweeplib
    from launcher.resources import check_data_path, load_run_config, make_plan, normalize_overrides

    base = Path.cwd()
    overrides = normalize_overrides(list(overrides))
    cfg = load_run_config(config, overrides)
    plan = make_plan(cfg)
    check_data_path(cfg, base)
    template_path = resolve_template(cfg, template, base)
    run_dir = absolute_run_dir(cfg, base)
    python = python_for_jobs(cfg)

    tasks: list[dict[str, Any]] = []
    if sweeps or trials is not None or sweep_mode != "grid":
        if not sweeps:
            raise ConfigError("--sweep-mode/--trials need at least one --sweep KEY=[...]")
        params = [sweeplib.parse_sweep(text) for text in sweeps]
        for p in params:
            if p.key.startswith("resources.") or p.key.startswith("run."):
                raise ConfigError(f"--sweep {p.key}: one job array shares its resources and run directory; "
                                  "sweep other keys")
        settings = sweeplib.expand(params, sweep_mode, trials, sweep_seed)
        for i, setting in enumerate(settings):
            task_dir = run_dir / f"sweep-{i}"
            task_over = sweeplib.task_overrides(setting, cfg.run.name, i, task_dir)
            try:
                task_cfg = load_run_config(config, [*overrides, *task_over])
                task_plan = make_plan(task_cfg)
            except ConfigError as err:
                raise ConfigError(f"sweep task {i} ({', '.join(task_over[:-2])}): {err}") from None
            if task_plan.world_size != plan.world_size:
                raise ConfigError(f"sweep task {i}: world size differs from the array's")
            tasks.append({"index": i, "setting": setting, "overrides": task_over[:-2], "run_dir": str(task_dir),
                          "config": task_cfg})
        if array_parallel is not None and array_parallel < 1:
            raise ConfigError(f"--parallel must be >= 1 (got {array_parallel})")

    spec = JobSpec(plan=plan, run_dir=run_dir, submit_dir=base,
                   config_path=None if tasks else run_dir / SNAPSHOT,
                   array_size=len(tasks), array_parallel=array_parallel, template=template_path, python=python)
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

    _tool("sbatch")  # fail before writing anything when there is no SLURM here
    test_only(script_text, base)  # partition, account, qos, constraint, node counts: asked of the cluster
    busy = active_job(run_dir)
    if busy:
        raise ConfigError(f"run dir {run_dir} already belongs to job {busy}, which is still queued or running "
                          "(bigtrain cancel it, or choose another run.dir)")
    run_dir.mkdir(parents=True, exist_ok=True)
    if tasks:
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
    if tasks:
        sweeplib.write_sweep_file(run_dir, {
            "job_id": job_id, "mode": sweep_mode, "keys": [p.key for p in params],
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

"""The sbatch script: ``#SBATCH`` directives, the srun step that starts the ranks, and the template.

Templates are plain text with ``{{name}}`` placeholders (see :data:`PLACEHOLDERS`). Every value
that reaches the shell is quoted with :func:`shlex.quote`; the only unquoted shell text is
constant (``$SLURM_NODEID`` and such). Nothing here runs a command or writes a file.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigtrain.config import ConfigError, RunConfig
from bigtrain.exit_codes import PRUNED, REQUEUE
from launcher.resources import Plan
from launcher.torchrun import Shell, deepspeed_command, sh_join, torchrun_command

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEMPLATE = ROOT / "slurm" / "bigtrain.sbatch"
SNAPSHOT = "submit-config.yaml"  # the resolved config a job runs, in its run directory

PLACEHOLDERS = {
    "directives": "the #SBATCH lines",
    "template": "the template's path",
    "summary": "one line: world size, nodes, launch mode",
    "submit_dir": "the directory `bigtrain submit` ran in (quoted)",
    "exports": "export lines: threads, resources.env, BIGTRAIN_RUN_DIR, BIGTRAIN_CONFIG",
    "task_setup": "array jobs: the task's run directory and config (a Bayesian sweep's task asks its study here)",
    "rdzv_port": "the rendezvous / MASTER_PORT (a number or a shell expression)",
    "pre_step": "commands before the step (the DeepSpeed hostfile)",
    "post_step": "commands after the step, with its exit status in $STATUS (a Bayesian sweep's task tells its study)",
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


@dataclass
class JobSpec:
    """Everything the script needs besides the plan. Paths are absolute."""

    plan: Plan
    run_dir: Path  # the run's directory; for an array, the sweep root
    submit_dir: Path
    config_path: Path | None = None  # the config snapshot (single job)
    array_size: int = 0  # > 0: a job array; task i runs RUN_DIR/sweep-<i>/submit-config.yaml
    array_parallel: int | None = None  # at most this many tasks at once
    bayes: bool = False  # an array of Bayesian-search trials: each task asks the study for its setting
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
        raise ConfigError(f"{what}: {text!r} holds a character an #SBATCH line cannot carry (quote, backslash or "
                          f"newline)")
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
                                    shutdown_timeout=res.stop_grace_s)
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


def render(spec: JobSpec, template_text: str | None = None) -> str:
    plan, res = spec.plan, spec.plan.cfg.resources
    text = spec.template.read_text() if template_text is None else template_text
    used = set(re.findall(r"\{\{\s*([A-Za-z_]+)\s*\}\}", text))
    unknown = sorted(used - set(PLACEHOLDERS))
    if unknown:
        raise ConfigError(f"template {spec.template}: unknown placeholder {{{{{unknown[0]}}}}} "
                          f"(known: {', '.join(sorted(PLACEHOLDERS))})")
    missing = [name for name in REQUIRED if name not in used]
    if missing:
        raise ConfigError(f"template {spec.template}: must contain {{{{{missing[0]}}}}} (the line that starts the "
                          f"ranks)")
    mode = f"{plan.launcher} per node" if plan.launch_mode == "torchrun" else "srun, one task per rank"
    pre_step = ""
    if plan.launch_mode == "torchrun" and plan.launcher == "deepspeed":
        pre_step = ('export BIGTRAIN_HOSTFILE="$BIGTRAIN_RUN_DIR/hostfile-$SLURM_JOB_ID"\n'
                    f'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\\$/ slots={plan.procs_per_node}/" '
                    '> "$BIGTRAIN_HOSTFILE"')
    task_setup = post_step = ""
    if spec.is_array:
        task_setup = ('echo "bigtrain: array task ${SLURM_ARRAY_TASK_ID} of job ${SLURM_ARRAY_JOB_ID}: '
                      'run dir ${BIGTRAIN_RUN_DIR}"')
    if spec.bayes:  # the trial's setting comes from the study; a requeued task keeps its trial
        root, python = shlex.quote(str(spec.run_dir)), shlex.quote(spec.python)
        task_setup += (f'\nASKED=$({python} -m launcher.bayes ask {root} "$SLURM_ARRAY_TASK_ID") || exit 2'
                       '\neval "$ASKED"')
        post_step = (f'[ "$STATUS" -eq {REQUEUE} ] || {python} -m launcher.bayes tell {root} '
                     '"$SLURM_ARRAY_TASK_ID" "$STATUS"'
                     f'\n[ "$STATUS" -eq {PRUNED} ] && STATUS=0  # a pruned trial is a finished task')
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
        "post_step": post_step,
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


def resolve_template(cfg: RunConfig, override: str | None, base: Path) -> Path:
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

"""SLURM: render the sbatch script, submit it, and ask about submitted runs (status, logs, cancel).

``bigtrain submit CONFIG [overrides]`` validates the config (and that nodes x procs_per_node
divides the global batch) *before* calling ``sbatch``; snapshots the resolved config into the
run directory (a requeued job reads exactly what was submitted, even if the YAML changed since);
renders ``slurm/bigtrain.sbatch`` (or ``resources.template`` / ``--template``); writes the script
into the run directory and submits it. ``RUN_DIR/slurm.json`` records the job for ``bigtrain
status|logs|cancel RUN_DIR``.

Modules: ``script`` (rendering: directives, the srun step, the template's placeholders),
``scheduler`` (the sbatch/scontrol/sacct/scancel calls, :class:`SlurmError`), ``records`` (the
job record in the run directory, log paths), ``monitor`` (status, logs, cancel), ``submission``
(submit). The sweep's job-array tasks come from :mod:`launcher.sweep`. No torch here.
"""

from launcher.slurm.monitor import cancel, follow, logs, status, wait_states
from launcher.slurm.records import (
    RECORD,
    active_job,
    log_paths,
    read_record,
    write_record,
)
from launcher.slurm.scheduler import (
    TERMINAL,
    SlurmError,
    job_records,
    run_tool,
    sbatch,
    test_only,
    tool_path,
)
from launcher.slurm.script import (
    DEFAULT_TEMPLATE,
    PLACEHOLDERS,
    REQUIRED,
    ROOT,
    SNAPSHOT,
    JobSpec,
    absolute_run_dir,
    directives,
    explicit_threads,
    exports,
    job_name,
    render,
    resolve_template,
    snapshot_config,
    step_command,
)
from launcher.slurm.submission import SCRIPT, submit

__all__ = [
    "DEFAULT_TEMPLATE", "PLACEHOLDERS", "RECORD", "REQUIRED", "ROOT", "SCRIPT", "SNAPSHOT", "TERMINAL", "JobSpec",
    "SlurmError", "absolute_run_dir", "active_job", "cancel", "directives", "explicit_threads", "exports", "follow",
    "job_name", "job_records", "log_paths", "logs", "read_record", "render", "resolve_template", "run_tool", "sbatch",
    "snapshot_config", "status", "step_command", "submit", "test_only", "tool_path", "wait_states", "write_record",
]

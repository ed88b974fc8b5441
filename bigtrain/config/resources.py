"""``resources``: where and how the ranks run, and the SLURM value checks (time limits, one-word values).

Field docstrings are descriptions (see :mod:`bigtrain.config.sections`)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from bigtrain.config.base import _Section

_SLURM_TIME = (r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}"
               r"|UNLIMITED|INFINITE)$")
_SLURM_WORD = r"^[^\s'\"\\]+$"  # a value that goes into an #SBATCH line as is: no whitespace or quotes


def slurm_time_seconds(text: str) -> int | None:
    """SLURM's --time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds; None if unlimited."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        h, m, s = parts
        return ((int(days) * 24 + h) * 60 + m) * 60 + s
    if len(parts) == 1:  # minutes
        return parts[0] * 60
    if len(parts) == 2:  # MM:SS
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


class ResourcesSection(_Section):
    """Where and how the ranks run: ``bigtrain launch`` (torchrun) and ``bigtrain submit`` (SLURM)."""

    nodes: int = Field(1, ge=1)
    """Nodes the run spans."""
    procs_per_node: int = Field(1, ge=1)
    """Ranks per node (one per GPU on GPU nodes)."""
    partition: str | None = None
    """SLURM partition (one word)."""
    time: str | None = None
    """SLURM time limit, e.g. "48:00:00" or "2-00:00:00" (quoted in YAML)."""
    account: str | None = None
    """SLURM account (one word)."""
    qos: str | None = None
    """SLURM quality of service (one word)."""
    constraint: str | None = None
    """SLURM node features, e.g. "a100&ib" (one word)."""
    cpus_per_task: int | None = Field(None, ge=1)
    """CPUs per rank (sets threads per rank)."""
    accelerator: Literal["auto", "gpu", "cpu"] = "auto"
    """gpu: every rank needs a CUDA device (a run that finds none stops with an error, and SLURM jobs
    ask for GPUs); cpu: never use one; auto: CUDA when present, else the CPU (CPU recipes)."""
    gpus_per_node: int | None = Field(None, ge=0)
    """GPUs a SLURM job asks for per node; default: one per rank with accelerator gpu, else 0."""
    gpu_type: Literal["h100", "h200", "a100-80g", "a100-40g", "cpu"] | None = None
    """The device the ranks run on, for the memory check before a launch (bigtrain plan): h100, h200,
    a100-80g, a100-40g, or cpu (the host's memory); null: no check unless --gpu-type is given."""
    mem: str | None = None
    """Memory per node, e.g. "64G"; "0" = all of it."""
    exclusive: bool = False
    """Ask SLURM for whole nodes."""
    sbatch_extra: list[str] = Field(default_factory=list)
    """More #SBATCH options, e.g. "--reservation=x"."""
    launch_mode: Literal["torchrun", "srun"] = "torchrun"
    """One torchrun per node, or one srun task per rank."""
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    """The per-node launcher (launch_mode torchrun)."""
    signal_grace_s: int = Field(120, ge=0, le=65535)
    """SLURM sends USR1 this many seconds before the time limit, to checkpoint (0: off). It also sets
    how long the ranks have to save and exit after a stop signal: see :attr:`stop_grace_s`."""
    rdzv_port: int | None = Field(None, ge=1024, le=65535)
    """The rendezvous port; default: derived from the SLURM job id."""
    max_restarts: int = Field(0, ge=0)
    """torchrun restarts of failed workers (SLURM requeues on preemption)."""
    max_requeues: int = Field(20, ge=0)
    """Stop requeueing a job that keeps getting preempted after this many requeues."""
    env: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """Environment variables exported in the job, e.g. NCCL_DEBUG: INFO."""
    template: str | None = None
    """The sbatch template; default: slurm/bigtrain.sbatch."""
    python: str | None = None
    """The interpreter on the compute nodes; default: the submitting one."""

    @field_validator("time", mode="before")
    @classmethod
    def _time_is_text(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ValueError(f"resources.time: quote the time limit, e.g. '48:00:00' (YAML read it as the number "
                             f"{value})")
        if isinstance(value, str) and not re.match(_SLURM_TIME, value):
            raise ValueError(f"resources.time: expected a SLURM time such as 30, 04:00:00 or 2-00:00:00 "
                             f"(got {value!r})")
        return value

    @field_validator("partition", "account", "qos", "constraint", mode="before")
    @classmethod
    def _one_word(cls, value: Any, info) -> Any:
        if isinstance(value, str) and not re.match(_SLURM_WORD, value):
            raise ValueError(f"resources.{info.field_name}: must be one word without spaces or quotes (got {value!r})")
        return value

    @field_validator("mem", mode="before")
    @classmethod
    def _mem_size(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # megabytes, as SLURM reads a bare number
        if isinstance(value, str) and not re.match(r"^\d+[KMGT]?$", value):
            raise ValueError(f"resources.mem: expected a size per node such as 64G, 4000M or 0 (got {value!r})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ResourcesSection:
        for line in self.sbatch_extra:
            if "\n" in line or "\r" in line or not line.strip():
                raise ValueError(f"resources.sbatch_extra: each entry is one #SBATCH option on one line (got {line!r})")
        for key, value in self.env.items():
            if not key.isidentifier() or not key.isascii():
                raise ValueError(f"resources.env: {key!r} is not a valid environment variable name")
            if "\n" in str(value) or "\0" in str(value):
                raise ValueError(f"resources.env.{key}: must be one line")
        if self.launcher == "deepspeed" and self.launch_mode == "srun":
            raise ValueError("resources.launcher 'deepspeed' starts the ranks itself: use "
                             "resources.launch_mode=torchrun")
        if self.accelerator == "cpu" and self.gpus_per_node:
            raise ValueError(f"resources.gpus_per_node ({self.gpus_per_node}): resources.accelerator is cpu")
        if self.gpus_per_node and self.procs_per_node > self.gpus_per_node:
            raise ValueError(f"resources.procs_per_node ({self.procs_per_node}) exceeds resources.gpus_per_node "
                             f"({self.gpus_per_node}): ranks would share GPUs")
        if self.time and self.signal_grace_s:
            limit = slurm_time_seconds(self.time)
            if limit is not None and self.signal_grace_s >= limit:
                raise ValueError(f"resources.signal_grace_s ({self.signal_grace_s}) must be shorter than "
                                 f"resources.time ({self.time})")
        return self

    @property
    def stop_grace_s(self) -> int:
        """Seconds the per-node agent gives its ranks to save and exit after it forwards a stop
        signal, before it kills them (``--shutdown-timeout``): ``signal_grace_s``, at least 30."""
        return max(30, self.signal_grace_s)

    @property
    def gpus_requested(self) -> int:
        """GPUs per node a job asks the scheduler for."""
        if self.gpus_per_node is not None:
            return self.gpus_per_node
        return self.procs_per_node if self.accelerator == "gpu" else 0

"""Run configuration: typed schema, YAML loading with includes, dotted overrides, validation.

A run is described by one YAML file. It may name other YAML files under ``defaults:``
(paths relative to itself); they are merged first, in order, and the file's own keys win.
Command-line overrides such as ``optim.lr=3e-4`` are applied last. The merged mapping is
validated into :class:`RunConfig`; any problem raises :class:`ConfigError` whose message is a
single line naming the key path and what was expected.

This module must stay importable without torch: the launcher uses it on login nodes.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem; ``str(err)`` is one line meant for the user."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


class RunSection(_Section):
    name: str = Field("run", min_length=1, pattern=r"^[A-Za-z0-9._\-]+$")
    dir: Optional[str] = None  # default: runs/<name>


class ModelSection(_Section):
    name: Literal["gpt2", "llama", "bert", "resnet"] = "gpt2"  # causal LMs | BERT encoder | ResNet CNN
    pretrained: Optional[str] = None  # local Hugging Face directory
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_kv_head: Optional[int] = Field(None, ge=1)  # llama only; default n_head
    d_model: int = Field(256, ge=8)
    d_ff: Optional[int] = Field(None, ge=8)  # default 4*d_model (gpt2) / ~8/3*d_model (llama)
    vocab_size: Optional[int] = Field(None, ge=2)  # default: the tokenizer's
    max_seq_len: Optional[int] = Field(None, ge=1)  # default: train.seq_len
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    tie_embeddings: bool = True
    rope_theta: float = Field(10000.0, gt=0)
    # resnet only: channels and residual blocks per stage, block type
    widths: list[int] = Field(default_factory=lambda: [32, 64, 128])
    depths: list[int] = Field(default_factory=lambda: [1, 1, 1])
    layer_type: Literal["basic", "bottleneck"] = "basic"

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelSection":
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.n_kv_head})")
        if len(self.widths) != len(self.depths) or not self.widths or min(self.widths + self.depths) < 1:
            raise ValueError(f"model.widths {self.widths} and model.depths {self.depths}: one positive entry per "
                             f"ResNet stage, same length")
        return self


class TokenizerSection(_Section):
    type: Literal["sentencepiece"] = "sentencepiece"
    model_type: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = Field(4096, ge=64, le=1_000_000)
    # an existing tokenizer instead of training one: a SentencePiece .model file, or a Hugging Face
    # tokenizer (a directory with tokenizer.json); default with model.pretrained: that checkpoint's
    path: Optional[str] = None
    sample_bytes: int = Field(20_000_000, ge=1000)  # corpus bytes the tokenizer trains on


class DataSourceSection(_Section):
    """One source of a mixture: its own inputs and weight; everything else comes from ``data``."""

    path: Union[str, list[str]]
    weight: float = Field(1.0, gt=0)
    download: Optional[Literal["shakespeare"]] = None
    text_field: Optional[str] = None  # default: data.text_field


class DataSection(_Section):
    path: Optional[Union[str, list[str]]] = None  # inputs (file, dir, glob; see data/sources.py) or a prepared dir
    # fetch into `path` if missing: a text corpus, or image sets (train/ and val/) for image_classification
    download: Optional[Literal["shakespeare", "digits", "synthetic-images"]] = None
    sources: Optional[list[DataSourceSection]] = None  # several inputs mixed by weight (instead of `path`)
    text_field: str = "text"  # the text field of .jsonl / column of .parquet, .tsv, HF datasets
    # sequence_classification: the label field, the label set (default: the training records'
    # distinct labels, sorted), and the held-out records (same fields as data.path)
    label_field: str = "label"
    labels: Optional[list[str]] = None
    val_path: Optional[str] = None
    reader: Literal["native", "hf"] = "native"  # "hf": read files with datasets.load_dataset(streaming=True)
    on_bad_record: Literal["error", "skip"] = "error"
    val_fraction: float = Field(0.01, gt=0.0, lt=0.5)
    cache_dir: Optional[str] = None  # default: $BIGTRAIN_CACHE or ~/.cache/bigtrain
    shard_tokens: int = Field(50_000_000, ge=1024)
    tokenizer: TokenizerSection = TokenizerSection()
    shuffle: bool = True
    shuffle_buffer: int = Field(16384, ge=1)  # samples permuted together (after a shard-level shuffle)
    num_workers: int = Field(0, ge=0)  # dataloader worker processes per rank
    prefetch_factor: int = Field(4, ge=1)  # micro-batches each worker keeps ready
    log_samples: bool = False  # write every micro-batch's sample ids to samples-rank<R>.jsonl
    mask_prob: float = Field(0.15, gt=0.0, lt=1.0)  # masked_lm: share of tokens (or words) masked
    whole_word_mask: bool = False  # masked_lm: mask whole words
    augment: bool = True  # image_classification: random crop (reflect padding) + horizontal flip

    @model_validator(mode="after")
    def _path_or_sources(self) -> "DataSection":
        if self.sources is not None and (self.path is not None or self.download is not None):
            raise ValueError("data: set either data.path (one source) or data.sources (a mixture), not both")
        if self.sources is not None and not self.sources:
            raise ValueError("data.sources: empty list (give at least one {path, weight})")
        return self

    def source_sections(self) -> list["DataSection"]:
        """One DataSection per source (a single-source config yields itself)."""
        if self.sources is None:
            return [self]
        return [self.model_copy(update={"path": s.path, "download": s.download, "sources": None,
                                        "text_field": s.text_field or self.text_field})
                for s in self.sources]

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources] if self.sources else [1.0]


class TrainSection(_Section):
    max_steps: int = Field(100, ge=1)
    global_batch_size: int = Field(16, ge=1)
    micro_batch_size: int = Field(16, ge=1)
    seq_len: int = Field(256, ge=2)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)  # 0: only at the end
    eval_batches: int = Field(20, ge=1)
    compile: bool = False
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables clipping
    sample_tokens: int = Field(64, ge=0)  # text sampled from the model at the end (0: none)
    sample_prompt: str = "\n"
    threads: Optional[int] = Field(None, ge=1)  # CPU threads per rank; default: cores / local ranks

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainSection":
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        return self


class OptimSection(_Section):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(1e-3, gt=0.0, lt=10.0)
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, gt=0.0)
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = "auto"


class ScheduleSection(_Section):
    warmup_steps: int = Field(0, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)


# DeepSpeed keys bigtrain generates from its own config; `extra` may not override them.
_DS_MANAGED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "bf16", "fp16")


class DeepSpeedSection(_Section):
    stage: int = Field(2, ge=0, le=3)
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state + step on the CPU (DeepSpeed's CPU Adam)
    offload_param: bool = False  # ZeRO-Infinity style parameter offload (stage 3 only)
    extra: dict[str, Any] = Field(default_factory=dict)  # merged into the generated DeepSpeed JSON

    @model_validator(mode="after")
    def _possible(self) -> "DeepSpeedSection":
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("strategy.deepspeed.offload_optimizer needs ZeRO stage 1, 2 or 3 (stage is 0)")
        if self.offload_param and self.stage != 3:
            raise ValueError(f"strategy.deepspeed.offload_param needs ZeRO stage 3 (stage is {self.stage})")
        for key in _DS_MANAGED:
            if key in self.extra:
                raise ValueError(f"strategy.deepspeed.extra.{key}: set by bigtrain from train.*/precision; "
                                 "change those keys instead")
        zero = self.extra.get("zero_optimization", {})
        if not isinstance(zero, dict):
            raise ValueError("strategy.deepspeed.extra.zero_optimization: expected a mapping")
        if "stage" in zero:
            raise ValueError("strategy.deepspeed.extra.zero_optimization.stage: use strategy.deepspeed.stage")
        for key, flag in (("offload_optimizer", self.offload_optimizer), ("offload_param", self.offload_param)):
            if key in zero and not flag and "optimizer" not in self.extra:
                raise ValueError(
                    f"strategy.deepspeed.extra.zero_optimization.{key}: ZeRO-Offload cannot step a client "
                    f"(torch) optimizer; set strategy.deepspeed.{key}: true so bigtrain configures DeepSpeed's CPU Adam")
        return self


class FSDPSection(_Section):
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    replicate: int = Field(1, ge=1)  # HSDP: replicate x shard = world size
    shard: Optional[int] = Field(None, ge=1)


class StrategySection(_Section):
    name: Literal["single", "ddp", "fsdp", "deepspeed"] = "single"
    activation_checkpointing: bool = False
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    fsdp: FSDPSection = FSDPSection()


class CheckpointSection(_Section):
    every_steps: int = Field(0, ge=0)  # 0: no step-based saves
    every_minutes: float = Field(0.0, ge=0.0)  # 0: no time-based saves
    keep_last: int = Field(2, ge=1)
    keep_every: int = Field(0, ge=0)  # also keep every checkpoint whose step is a multiple (0: none)
    async_: bool = Field(False, alias="async")  # write while training continues (one in flight)
    resume: str = Field("auto", min_length=1)  # auto | never | PATH to a step-N directory
    save_final: bool = True
    save_on_preempt: bool = True  # SIGTERM/SIGUSR1: save at the next step, exit with code 75
    on_save_error: Literal["stop", "continue"] = "stop"
    verify: Literal["checksum", "size"] = "checksum"  # how resume checks a checkpoint's files

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class WandbSection(_Section):
    mode: Literal["online", "offline", "disabled"] = "disabled"
    project: str = "bigtrain"
    entity: Optional[str] = None
    tags: list[str] = Field(default_factory=list)


class TrackingSection(_Section):
    wandb: WandbSection = WandbSection()
    console: Literal["auto", "progress", "plain"] = "auto"


_SLURM_TIME = r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}|UNLIMITED|INFINITE)$"
_SLURM_WORD = r"^[^\s'\"\\]+$"  # a value that goes into an #SBATCH line as is: no whitespace or quotes


def slurm_time_seconds(text: str) -> Optional[int]:
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
    procs_per_node: int = Field(1, ge=1)  # ranks per node (one per GPU on GPU nodes)
    partition: Optional[str] = None
    time: Optional[str] = None  # SLURM time limit, e.g. "48:00:00" or "2-00:00:00" (quoted in YAML)
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None  # e.g. "a100&ib"
    cpus_per_task: Optional[int] = Field(None, ge=1)  # CPUs per rank (sets threads per rank)
    # gpu: every rank needs a CUDA device (a run that finds none stops with an error, and SLURM jobs
    # ask for GPUs); cpu: never use one; auto: CUDA when present, else the CPU (CPU recipes)
    accelerator: Literal["auto", "gpu", "cpu"] = "auto"
    gpus_per_node: Optional[int] = Field(None, ge=0)  # default: one per rank with accelerator gpu, else 0
    mem: Optional[str] = None  # per node, e.g. "64G"; "0" = all of it
    exclusive: bool = False
    sbatch_extra: list[str] = Field(default_factory=list)  # more #SBATCH options, e.g. "--reservation=x"
    launch_mode: Literal["torchrun", "srun"] = "torchrun"  # one torchrun per node, or one srun task per rank
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"  # the per-node launcher (torchrun mode)
    signal_grace_s: int = Field(120, ge=0, le=65535)  # SLURM sends USR1 this long before the limit (0: off)
    rdzv_port: Optional[int] = Field(None, ge=1024, le=65535)  # default: derived from the job id
    max_restarts: int = Field(0, ge=0)  # torchrun restarts of failed workers (SLURM requeues on preemption)
    max_requeues: int = Field(20, ge=0)  # stop requeueing a job that keeps getting preempted
    env: dict[str, Union[str, int, float, bool]] = Field(default_factory=dict)  # exported in the job, e.g. NCCL_DEBUG: INFO
    template: Optional[str] = None  # sbatch template; default slurm/bigtrain.sbatch
    python: Optional[str] = None  # interpreter on the compute nodes; default: the submitting one

    @field_validator("time", mode="before")
    @classmethod
    def _time_is_text(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ValueError(f"resources.time: quote the time limit, e.g. '48:00:00' (YAML read it as the number {value})")
        if isinstance(value, str) and not re.match(_SLURM_TIME, value):
            raise ValueError(f"resources.time: expected a SLURM time such as 30, 04:00:00 or 2-00:00:00 (got {value!r})")
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
    def _consistent(self) -> "ResourcesSection":
        for line in self.sbatch_extra:
            if "\n" in line or "\r" in line or not line.strip():
                raise ValueError(f"resources.sbatch_extra: each entry is one #SBATCH option on one line (got {line!r})")
        for key, value in self.env.items():
            if not key.isidentifier() or not key.isascii():
                raise ValueError(f"resources.env: {key!r} is not a valid environment variable name")
            if "\n" in str(value) or "\0" in str(value):
                raise ValueError(f"resources.env.{key}: must be one line")
        if self.launcher == "deepspeed" and self.launch_mode == "srun":
            raise ValueError("resources.launcher 'deepspeed' starts the ranks itself: use resources.launch_mode=torchrun")
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
    def gpus_requested(self) -> int:
        """GPUs per node a job asks the scheduler for."""
        if self.gpus_per_node is not None:
            return self.gpus_per_node
        return self.procs_per_node if self.accelerator == "gpu" else 0


TASK_MODELS = {  # what each task trains, and on which models
    "causal_lm": ("gpt2", "llama"),  # next-token prediction on packed text
    "masked_lm": ("bert",),  # BERT pretraining: masked tokens of packed text
    "image_classification": ("resnet",),  # labelled image sets
    "sequence_classification": ("bert",),  # (text, label) records: fine-tuning, or from scratch
}
PACKED_TEXT_TASKS = ("causal_lm", "masked_lm")  # trained on prepared token shards


class RunConfig(_Section):
    run: RunSection = RunSection()
    task: Literal["causal_lm", "masked_lm", "image_classification", "sequence_classification"] = "causal_lm"
    seed: int = 1337
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    optim: OptimSection = OptimSection()
    schedule: ScheduleSection = ScheduleSection()
    strategy: StrategySection = StrategySection()
    checkpoint: CheckpointSection = CheckpointSection()
    tracking: TrackingSection = TrackingSection()
    resources: ResourcesSection = ResourcesSection()

    @model_validator(mode="after")
    def _task_fits(self) -> "RunConfig":
        models = TASK_MODELS[self.task]
        if self.model.name not in models:
            raise ValueError(f"model.name: '{self.model.name}' cannot train task '{self.task}' "
                             f"(expected {' or '.join(models)})")
        images = not self.text_task
        if self.data.download and (self.data.download in ("digits", "synthetic-images")) != images:
            raise ValueError(f"data.download: '{self.data.download}' is not data for task '{self.task}'")
        if images and self.data.sources is not None:
            raise ValueError("data.sources: mixtures are for text tasks; image_classification reads data.path")
        if images and not isinstance(self.data.path, str):
            raise ValueError("data.path: image_classification needs one directory (holding train/ and val/)")
        if self.task == "sequence_classification" and (self.data.sources is not None or self.data.download):
            raise ValueError("data: sequence_classification reads data.path (and data.val_path), "
                             "not data.sources or data.download")
        if self.data.val_path is not None and self.task != "sequence_classification":
            raise ValueError(f"data.val_path: only for sequence_classification (task '{self.task}' "
                             f"holds out part of data.path)")
        if self.model.pretrained and self.task == "masked_lm":
            raise ValueError("model.pretrained: fine-tuning is supported for causal_lm and sequence_classification; "
                             "masked_lm trains bigtrain's BERT with its own SentencePiece vocabulary")
        if self.model.pretrained and self.text_task and self.data.tokenizer.path is None:
            # a checkpoint only makes sense with the tokenizer it was trained with
            self.data.tokenizer.path = self.model.pretrained
        if self.model.name == "resnet" and self.strategy.activation_checkpointing:
            raise ValueError("strategy.activation_checkpointing: not supported for resnet (recomputing a "
                             "block would update its BatchNorm statistics twice)")
        return self

    @property
    def text_task(self) -> bool:
        """Trains on text (with a tokenizer)."""
        return self.task != "image_classification"

    @property
    def packed_text(self) -> bool:
        """Trains on prepared token shards (the launcher prepares them before the ranks start)."""
        return self.task in PACKED_TEXT_TASKS

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) if self.run.dir else Path("runs") / self.run.name

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches each rank accumulates per optimizer step."""
        return self.train.global_batch_size // (self.train.micro_batch_size * world_size)

    def check_world_size(self, world_size: int) -> None:
        """Raise ConfigError unless the global batch splits evenly over ``world_size`` ranks."""
        per_step = self.train.micro_batch_size * world_size
        if world_size < 1 or self.train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size x world size ({self.train.micro_batch_size} x {world_size})"
            )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively by ``override`` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml_tree(path: str | os.PathLike[str], _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load a YAML config, merging the files listed under ``defaults:`` first."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: circular 'defaults' include")
    data = _read_yaml(path)
    includes = data.pop("defaults", []) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"{path}: 'defaults' must be a list of YAML file paths")
    merged: dict[str, Any] = {}
    for inc in includes:
        merged = deep_merge(merged, load_yaml_tree(path.parent / inc, _seen + (path,)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], 0.0003). Values are parsed as YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': expected KEY=VALUE with a dotted key, e.g. optim.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(tree)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{text}': {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if p != "__root__")
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
        return msg if not loc or loc in msg else f"{loc}: {msg}"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown config key"
    got = first.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{loc}: {msg[0].lower()}{msg[1:]}{got_text}"


def validate(tree: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise ConfigError(_format_error(err) + extra) from None


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> RunConfig:
    """Load, merge includes, apply overrides and validate. Raises ConfigError with a one-line message.

    ``run.name`` defaults to the config file's stem when no file in the include chain sets it.
    """
    tree = load_yaml_tree(path)
    tree.setdefault("run", {})
    if isinstance(tree["run"], dict):
        tree["run"].setdefault("name", Path(path).stem)
    tree = apply_overrides(tree, overrides or [])
    _download_only_recipe_path(tree, overrides or [])
    return validate(tree)


def _download_only_recipe_path(tree: dict[str, Any], overrides: list[str]) -> None:
    """``data.download`` fills the recipe's own ``data.path``, never a path given on the command
    line (unless the download is asked for there too): a mistyped path must be an error, not a
    fresh download under that name."""
    keys = {".".join(parse_override(text)[0]) for text in overrides}
    data = tree.get("data")
    if isinstance(data, dict) and "data.path" in keys and "data.download" not in keys:
        data["download"] = None

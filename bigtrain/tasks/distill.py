"""Knowledge distillation (the ``distill`` section) for causal LM, sequence and image classification.

The teacher is a bigtrain run directory (its newest valid checkpoint, rebuilt the way ``bigtrain
export`` rebuilds it, on any engine's format) or a Hugging Face ``save_pretrained`` directory. It
is loaded on every rank, frozen (``requires_grad_(False)``, ``eval()``), moved to the device and
kept outside the engine: never in the optimizer, never in a checkpoint (those hold the student;
export writes the student). Its forward runs under ``torch.no_grad()`` and the autocast of the run's
precision, on the student's inputs.

The objective of a micro-batch: ``alpha x KL(teacher || student) x T^2 + (1 - alpha) x CE``, the
KL between the temperature-``T``-softened distributions per target token (causal LM: over the
vocabulary, -100 positions ignored, averaged over the target tokens like the CE) or per sample
(classification), the CE the task's own loss (label smoothing, mixup targets included).
Evaluation is the task's, on the student alone.

Checked before training (one-line ConfigError, exit 2): the teacher trains the same kind of model
(its Auto class); text tasks: the same tokenizer (fingerprint) and, causal LM, vocabulary size;
classification: the same labels, in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from torch import nn

from bigtrain.checkpoint import CheckpointError, verify
from bigtrain.config import ConfigError, RunConfig, validate
from bigtrain.config.distill import check_teacher, teacher_tokenizer
from bigtrain.data.tokenizer import load_tokenizer
from bigtrain.dist import DistInfo
from bigtrain.losses import distillation_kl
from bigtrain.strategies.base import autocast
from bigtrain.tasks import Task, task_class

KEY = "distill.teacher"


def _run_teacher(path: Path, auto_class: str) -> tuple[nn.Module, str]:
    """A run directory's newest valid checkpoint as a plain model on CPU (LoRA adapters merged)."""
    from bigtrain.export import build_empty_model, build_lora_model, find_checkpoint, load_model_weights

    try:
        ckpt = find_checkpoint(path, None, who="distill from")
        manifest = verify(ckpt, "size")
        cfg = validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
        if task_class(cfg.task).auto_class != auto_class:
            raise ConfigError(f"{KEY}: {path} trained task '{cfg.task}' ({task_class(cfg.task).auto_class}); this "
                              f"run's student needs a {auto_class} teacher")
        if cfg.model.lora is not None:
            model = build_lora_model(cfg, ckpt, path)
            load_model_weights(manifest["strategy"], ckpt, model, partial=True)
            model = model.merge_and_unload()
        else:
            model = build_empty_model(cfg, ckpt, path, None)
            load_model_weights(manifest["strategy"], ckpt, model)
    except (CheckpointError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{KEY}: {err}") from None
    return model, str(ckpt)


def _hf_teacher(path: Path, auto_class: str) -> tuple[nn.Module, str]:
    import transformers

    from bigtrain.models.gpt import load_pretrained

    try:
        return load_pretrained(getattr(transformers, auto_class), str(path)), str(path)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"{KEY}: {path}: not a {auto_class} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from None


def load_teacher(teacher: str, task: Task) -> tuple[nn.Module, str]:
    """The frozen teacher model (CPU, fp32, eval mode) and where it came from. The CPU random state
    is restored afterwards: building a model draws initial weights, and the student's run (dropout,
    augmentation) must not depend on whether it distills."""
    path = Path(teacher)
    with torch.random.fork_rng(devices=[]):
        load = _run_teacher if check_teacher(teacher) == "run" else _hf_teacher
        model, source = load(path, task.auto_class)
    model.requires_grad_(False)
    return model.eval(), source


def _labels(model: nn.Module) -> list[str]:
    config = model.config
    return [str(config.id2label.get(i, config.id2label.get(str(i), i))) for i in range(config.num_labels)]


def check_teacher_fits(teacher: nn.Module, student: nn.Module, task: Task) -> None:
    """The teacher reads the student's inputs and scores the same classes, or a one-line ConfigError."""
    cfg = task.cfg
    if cfg.text_task:
        where = teacher_tokenizer(cfg.distill.teacher)
        if where is None:
            raise ConfigError(f"{KEY}: {cfg.distill.teacher} holds no tokenizer (tokenizer.json or tokenizer.model); "
                              f"the student must read the teacher's token ids")
        if load_tokenizer(where).fingerprint != task.tokenizer.fingerprint:
            raise ConfigError(f"{KEY}: the teacher's tokenizer ({where}) differs from the student's "
                              f"(data.tokenizer.path: {cfg.data.tokenizer.path}); the student must use the teacher's "
                              f"tokenizer (leave data.tokenizer.path unset to get it)")
    if cfg.task == "causal_lm":
        t, s = teacher.config.vocab_size, student.config.vocab_size
        if t != s:
            raise ConfigError(f"{KEY}: the teacher's vocabulary has {t} entries, the student's {s} (model.vocab_size); "
                              f"logit distillation needs the same vocabulary")
    else:
        t_labels, s_labels = _labels(teacher), _labels(student)
        if t_labels != s_labels:
            raise ConfigError(f"{KEY}: the teacher classifies {len(t_labels)} labels {t_labels}, the student "
                              f"{len(s_labels)} {s_labels}; distillation needs the same labels in the same order")


class Distiller:
    """The distillation objective of a task, with its frozen teacher on ``device``."""

    def __init__(self, task: Task, teacher: nn.Module, device: torch.device):
        self.task, self.section = task, task.cfg.distill
        self.teacher, self.device = teacher.to(device), device

    @classmethod
    def build(cls, cfg: RunConfig, task: Task, student: nn.Module, info: DistInfo,
              log: Callable[[str], None]) -> Distiller:
        """Load the teacher (every rank), check that it fits the student, log what it is."""
        teacher, source = load_teacher(cfg.distill.teacher, task)
        check_teacher_fits(teacher, student, task)
        n = sum(p.numel() for p in teacher.parameters())
        log(f"distill: teacher {source} ({teacher.config.model_type}, {n / 1e6:.2f}M params, frozen), "
            f"alpha {cfg.distill.alpha}, temperature {cfg.distill.temperature}")
        return cls(task, teacher, info.device)

    def teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's logits on the student's inputs, without gradients, in the run's precision
        (floating inputs in fp32 first: DeepSpeed hands the student bf16 images)."""
        inputs = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
        with torch.no_grad(), autocast(self.device, self.task.cfg.precision):
            return self.task.logits_and_labels(self.teacher, inputs)[0]

    def objective(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, labels = self.task.logits_and_labels(model, batch)
        loss = self.task.label_loss(logits, labels, batch)
        kl = distillation_kl(logits, self.teacher_logits(batch), labels, self.section.temperature)
        return self.section.alpha * kl + (1.0 - self.section.alpha) * loss

    def teacher_flops_per_sample(self) -> float:
        """The teacher's forward FLOPs per sample (a third of the task's training count)."""
        return self.task.flops_per_sample(self.teacher) / 3.0

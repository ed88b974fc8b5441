"""The ``distill`` section: knowledge distillation from a frozen teacher (torch-free: the launcher
checks the teacher's directory before any rank starts; ``bigtrain/tasks/distill.py`` loads it)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field

from bigtrain.config.base import ConfigError, _Section

DISTILL_TASKS = ("causal_lm", "sequence_classification", "image_classification")


class DistillSection(_Section):
    """Knowledge distillation: the run's model (the student) also learns the temperature-softened
    outputs of a frozen teacher. Loss: alpha x KL(teacher || student at temperature T) x T^2 +
    (1 - alpha) x the task's cross-entropy on the labels; evaluation is the student's plain loss."""

    teacher: str = Field(min_length=1)
    """The teacher: a bigtrain run directory (its newest valid checkpoint, as bigtrain export picks it) or a
    Hugging Face save_pretrained directory; it must classify the same labels (classification) or share the
    student's tokenizer (text tasks: the student defaults to the teacher's tokenizer)."""
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    """The KL term's weight; 1 - alpha weighs the cross-entropy on the labels."""
    temperature: float = Field(2.0, gt=0.0)
    """Both models' logits are divided by it before the softmax of the KL term (which is scaled by its square)."""


def teacher_kind(path: str | os.PathLike[str]) -> str | None:
    """``"run"`` (a bigtrain run directory: ``checkpoints/``), ``"hf"`` (``config.json``), or None."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return "run"
    if (path / "config.json").is_file():
        return "hf"
    return None


def teacher_tokenizer(path: str | os.PathLike[str]) -> str | None:
    """What ``data.tokenizer.path`` should name to tokenize like the teacher: its directory when it
    holds ``tokenizer.json``, else its ``tokenizer.model``; None when it holds neither (yet)."""
    path = Path(path)
    if (path / "tokenizer.json").is_file():
        return str(path)
    if (path / "tokenizer.model").is_file():
        return str(path / "tokenizer.model")
    return None


def check_teacher(teacher: str, base: Path | None = None) -> str:
    """``distill.teacher`` is a run directory or a Hugging Face directory (its kind), else a
    one-line ConfigError; relative paths are relative to ``base`` when given."""
    path = Path(os.path.expanduser(teacher))
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.exists():
        raise ConfigError(f"distill.teacher: {teacher} does not exist (a bigtrain run directory or a Hugging Face "
                          f"model directory)")
    kind = teacher_kind(path)
    if kind is None:
        raise ConfigError(f"distill.teacher: {teacher} is neither a bigtrain run directory (no checkpoints/) nor a "
                          f"Hugging Face model directory (no config.json)")
    return kind

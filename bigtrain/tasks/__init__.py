"""What a run trains (``task`` in the config): data, model, objective and evaluation, one module
per task. ``train.py`` drives any of them through :class:`bigtrain.tasks.base.Task`."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from bigtrain.config import RunConfig
from bigtrain.dist import DistInfo
from bigtrain.tasks.base import Task

# task name -> (module, class); imported only when used
TASKS = {
    "causal_lm": ("bigtrain.tasks.causal_lm", "CausalLMTask"),
    "masked_lm": ("bigtrain.tasks.masked_lm", "MaskedLMTask"),
    "image_classification": ("bigtrain.tasks.image_classification", "ImageClassificationTask"),
    "sequence_classification": ("bigtrain.tasks.sequence_classification", "SequenceClassificationTask"),
    "sft": ("bigtrain.tasks.sft", "SFTTask"),
}


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"task: unknown task '{name}' (expected one of {', '.join(TASKS)})")
    module, attr = TASKS[name]
    return getattr(importlib.import_module(module), attr)


def build_task(cfg: RunConfig, info: DistInfo, log: Callable[[str], None]) -> Task:
    return task_class(cfg.task)(cfg, info, log)


__all__ = ["TASKS", "Task", "build_task", "task_class"]

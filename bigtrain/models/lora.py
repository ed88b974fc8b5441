"""LoRA through peft: low-rank adapters on a pretrained model's linear layers.

Only the adapters (and, for classifiers, the new head) require gradients. Checkpoints hold just
those (:func:`trainable_names`); the frozen weights come back from ``model.pretrained`` at every
start and at export, which merges the adapters (``merge_and_unload``) or writes them as a peft
adapter directory.
"""

from __future__ import annotations

from torch import nn

from bigtrain.config import ConfigError, LoraSection

# which peft task each bigtrain task is (classifiers keep their new head trainable)
PEFT_TASKS = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS", "masked_lm": None}


def apply_lora(model: nn.Module, cfg: LoraSection, task: str) -> nn.Module:
    """``model`` wrapped by peft with adapters as configured; ConfigError when the target modules
    match nothing (naming the model's linear layers)."""
    from peft import LoraConfig, TaskType, get_peft_model

    if task not in PEFT_TASKS:
        raise ConfigError(f"model.lora: not supported for task '{task}'")
    kind = PEFT_TASKS[task]
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                        task_type=getattr(TaskType, kind) if kind else None)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"})
        raise ConfigError(f"model.lora.target_modules: {cfg.target_modules or 'the default'} match no layer of "
                          f"{type(model).__name__} (its linear layers: {', '.join(linear)}) ({err})") from None


def trainable_names(model: nn.Module) -> set[str]:
    """State-dict keys of the parameters that train (what a LoRA checkpoint holds)."""
    return {name for name, p in model.named_parameters() if p.requires_grad}

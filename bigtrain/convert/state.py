"""The engine-neutral training state a conversion goes through, and the model layout it is
checked against.

``FullState``: fp32 weights by parameter name (tied weights once, under the model's first name),
AdamW's state per parameter (``step``, ``exp_avg``, ``exp_avg_sq``), the optimizer's parameter
groups (hyper-parameters and the names of their parameters, in the order ``param_groups`` builds
them), persistent buffers, and the gradient scaler's state (fp16 only). The trainer's own state
(step, data position, RNG, schedule) is engine-independent and copied as files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from bigtrain.checkpoint import CheckpointError

ADAM_KEYS = ("step", "exp_avg", "exp_avg_sq")


@dataclass
class FullState:
    weights: dict[str, torch.Tensor]
    optim: dict[str, dict[str, torch.Tensor]]
    groups: list[dict[str, Any]]  # hyper-parameters + "params": [names]
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    scaler: dict[str, Any] | None = None  # torch GradScaler.state_dict() (fp16 runs on single/ddp/fsdp)


@dataclass
class Layout:
    """What the checkpoint's model holds: trainable parameters by group (names, in the order the
    engines' optimizers see them), their shapes, tied aliases (alias -> name) and buffers."""
    groups: list[list[str]]
    shapes: dict[str, tuple[int, ...]]
    aliases: dict[str, str]
    buffers: list[str]

    @property
    def params(self) -> list[str]:
        return [n for g in self.groups for n in g]


def checkpoint_config(ckpt: Path):
    from bigtrain.config import ConfigError, validate

    try:
        return validate(yaml.safe_load((ckpt / "config.yaml").read_text()))
    except (ConfigError, OSError) as err:
        raise CheckpointError(f"{ckpt / 'config.yaml'}: {err}") from None


def model_layout(ckpt: Path, run_dir: Path | None = None) -> Layout:
    """The layout of the checkpoint's model, built on the meta device (no memory, no weights)."""
    from bigtrain.export import build_empty_model
    from bigtrain.optim import param_groups

    cfg = checkpoint_config(ckpt)
    if cfg.model.lora is not None:
        raise CheckpointError(f"{ckpt}: a LoRA checkpoint holds the adapters alone; convert supports full training")
    vocab = None
    if not (ckpt / "hf_config.json").is_file():
        from bigtrain.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

        tok = next((d / n for d in (ckpt, run_dir or ckpt) for n in (HFTokenizer.main_file, Tokenizer.main_file)
                    if (d / n).is_file()), None)
        vocab = load_tokenizer(tok).vocab_size if tok else None
    with torch.device("meta"):
        model = build_empty_model(cfg, ckpt, run_dir or ckpt.parent.parent, vocab)
    names = {id(p): n for n, p in model.named_parameters()}
    aliases = {n: names[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if names[id(p)] != n}
    groups = [[names[id(p)] for p in g["params"]] for g in param_groups(model, cfg.optim.weight_decay)]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    buffers = [k for k in model.state_dict() if k not in shapes and k not in aliases]
    return Layout(groups, shapes, aliases, buffers)


def check(state: FullState, layout: Layout, where: Path) -> None:
    """CheckpointError naming the first tensor or state that is missing or has the wrong shape."""
    for name in layout.params:
        if name not in state.weights:
            raise CheckpointError(f"{where}: no fp32 weight for parameter {name}")
        if tuple(state.weights[name].shape) != layout.shapes[name]:
            raise CheckpointError(f"{where}: {name} has shape {tuple(state.weights[name].shape)}, the model "
                                  f"{layout.shapes[name]}")
        moments = state.optim.get(name)
        if moments is None:
            raise CheckpointError(f"{where}: no optimizer state for parameter {name} (convert carries AdamW's)")
        for key in ADAM_KEYS:
            if key not in moments:
                other = sorted(set(moments) - set(ADAM_KEYS))
                hint = f" (it has {', '.join(other)}: not AdamW's state)" if other else ""
                raise CheckpointError(f"{where}: no AdamW {key} for parameter {name}{hint}")
            if key != "step" and tuple(moments[key].shape) != layout.shapes[name]:
                raise CheckpointError(f"{where}: {key} of {name} has shape {tuple(moments[key].shape)}, the "
                                      f"model {layout.shapes[name]}")
    if [g["params"] for g in state.groups] != layout.groups:
        raise CheckpointError(f"{where}: the optimizer's parameter groups do not match the model's "
                              f"({[len(g['params']) for g in state.groups]} vs {[len(g) for g in layout.groups]} "
                              f"parameters)")
    for name in layout.buffers:
        if name not in state.buffers:
            raise CheckpointError(f"{where}: no value for buffer {name}")


def hyper(group: dict[str, Any]) -> dict[str, Any]:
    """A parameter group's hyper-parameters (JSON-safe: tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in group.items() if k != "params"}


def read_manifest(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "manifest.json").read_text())

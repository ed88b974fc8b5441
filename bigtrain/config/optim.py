"""The ``optim`` and ``schedule`` sections: each optimizer's and decay's own keys, validated against
the choice (a key that does not apply is an error naming it) and left out of the resolved config.

Field docstrings are descriptions (see :mod:`bigtrain.config.sections`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_serializer, model_validator

from bigtrain.config.base import _Section

# optim keys that only some optimizers take (name, lr and weight_decay apply to all of them)
OPTIM_KEYS: dict[str, tuple[str, ...]] = {
    "beta1": ("adamw", "lion", "adafactor"),
    "beta2": ("adamw", "lion"),
    "eps": ("adamw", "rmsprop"),
    "momentum": ("sgd", "rmsprop"),
    "nesterov": ("sgd",),
    "alpha": ("rmsprop",),
    "centered": ("rmsprop",),
    "decay_rate": ("adafactor",),
    "clip_threshold": ("adafactor",),
    "implementation": ("adamw", "sgd", "rmsprop"),
}
FUSED_OPTIMIZERS = ("adamw", "sgd")  # torch has fused kernels for these

# schedule keys that only some decays take
SCHEDULE_KEYS: dict[str, tuple[str, ...]] = {
    "min_lr_ratio": ("cosine", "linear"),
    "step_size": ("step",),
    "gamma": ("step",),
    "pct_start": ("onecycle",),
    "div_factor": ("onecycle",),
    "final_div_factor": ("onecycle",),
}


def _names(values: tuple[str, ...]) -> str:
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} and {values[-1]}"


def _check_keys(section: _Section, prefix: str, keys: dict[str, tuple[str, ...]], selector: str) -> None:
    """A key the user set that does not apply to the chosen optimizer/decay is an error naming it."""
    choice = getattr(section, selector)
    for key in sorted(section.model_fields_set, key=list(type(section).model_fields).index):
        if key in keys and choice not in keys[key]:
            raise ValueError(f"{prefix}.{key}: only for {_names(keys[key])} ({prefix}.{selector} is {choice})")


def _drop_inapplicable(data: dict[str, Any], keys: dict[str, tuple[str, ...]], choice: str) -> dict[str, Any]:
    """The resolved config shows (and a checkpoint's config.yaml keeps) only the keys that apply."""
    return {k: v for k, v in data.items() if k not in keys or choice in keys[k]}


class OptimSection(_Section):
    """The optimizer; weight decay spares biases and norm gains. Keys that do not apply to optim.name are errors."""

    name: Literal["adamw", "sgd", "rmsprop", "adafactor", "lion"] = "adamw"
    """The optimizer: adamw, sgd, rmsprop (torch's), adafactor (transformers', factored second moment, stepped
    by the schedule), lion (lion-pytorch's sign update)."""
    lr: float = Field(1e-3, gt=0.0, lt=10.0)
    """Peak learning rate (see schedule)."""
    weight_decay: float = Field(0.1, ge=0.0)
    """Weight decay of weight matrices and embeddings: decoupled (adamw, adafactor, lion: p -= lr x wd x p), or
    L2 added to the gradient (sgd, rmsprop)."""
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    """First-moment decay: adamw; lion (the update's interpolation); adafactor: momentum, only when set (default:
    none, as in the paper)."""
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    """Second-moment decay (adamw); lion: the momentum's decay."""
    eps: float = Field(1e-8, gt=0.0)
    """The denominator's epsilon (adamw, rmsprop)."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """sgd and rmsprop: momentum (0: none)."""
    nesterov: bool = False
    """sgd: Nesterov momentum."""
    alpha: float = Field(0.99, gt=0.0, le=1.0)
    """rmsprop: decay of the squared-gradient average."""
    centered: bool = False
    """rmsprop: divide by the gradient's estimated standard deviation instead of its root mean square."""
    decay_rate: float = Field(-0.8, lt=0.0)
    """adafactor: the second moment's decay at step t is 1 - t^decay_rate."""
    clip_threshold: float = Field(1.0, gt=0.0)
    """adafactor: an update whose RMS exceeds this is scaled down to it."""
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = "auto"
    """The torch kernel (adamw, sgd, rmsprop); auto: fused when every parameter supports it (adamw, sgd; not
    under fsdp or deepspeed), else foreach."""

    @model_validator(mode="after")
    def _keys_apply(self) -> OptimSection:
        _check_keys(self, "optim", OPTIM_KEYS, "name")
        if self.implementation == "fused" and self.name not in FUSED_OPTIMIZERS:
            raise ValueError(f"optim.implementation: fused is only for {_names(FUSED_OPTIMIZERS)} "
                             f"(optim.name is {self.name})")
        if self.nesterov and self.momentum == 0:
            raise ValueError("optim.nesterov: needs optim.momentum > 0")
        return self

    @model_serializer(mode="wrap")
    def _applicable(self, handler):
        data = _drop_inapplicable(handler(self), OPTIM_KEYS, self.name)
        if self.name == "adafactor" and "beta1" not in self.model_fields_set:
            data.pop("beta1", None)  # adafactor's momentum is off unless asked for
        return data

    @property
    def adafactor_beta1(self) -> float | None:
        """Adafactor's momentum: optim.beta1 where the config sets it, else none."""
        return self.beta1 if "beta1" in self.model_fields_set else None


class ScheduleSection(_Section):
    """The learning-rate schedule: warmup, then decay (a pure function of the step: bigtrain/optim.py lr_at)."""

    warmup_steps: int = Field(0, ge=0)
    """Steps of linear warmup from 0 to optim.lr (onecycle: from optim.lr / div_factor, unless
    schedule.pct_start is set)."""
    decay: Literal["cosine", "linear", "constant", "step", "onecycle"] = "cosine"
    """After warmup: cosine or linear decay to min_lr_ratio x optim.lr at train.max_steps, constant, step (x gamma
    every step_size steps), or onecycle (from optim.lr / div_factor up to optim.lr, then cosine down to optim.lr /
    final_div_factor at train.max_steps)."""
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0)
    """cosine and linear: the final learning rate as a share of optim.lr."""
    step_size: int | None = Field(None, ge=1)
    """step: steps (after warmup) between two multiplications by schedule.gamma; required for step."""
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    """step: the factor."""
    pct_start: float | None = Field(None, ge=0.0, lt=1.0)
    """onecycle: the share of train.max_steps spent warming up (round(pct_start x max_steps) steps); default:
    schedule.warmup_steps steps."""
    div_factor: float = Field(25.0, ge=1.0)
    """onecycle: the warmup starts at optim.lr / div_factor."""
    final_div_factor: float = Field(1e4, ge=1.0)
    """onecycle: the cosine decay ends at optim.lr / final_div_factor (at train.max_steps)."""

    @model_validator(mode="after")
    def _keys_apply(self) -> ScheduleSection:
        _check_keys(self, "schedule", SCHEDULE_KEYS, "decay")
        if self.decay == "step" and self.step_size is None:
            raise ValueError("schedule.step_size: required for schedule.decay step")
        return self

    @model_serializer(mode="wrap")
    def _applicable(self, handler):
        return _drop_inapplicable(handler(self), SCHEDULE_KEYS, self.decay)

"""Training engines behind one interface (see ``base.Strategy``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from bigtrain.config import RunConfig
from bigtrain.dist import DistInfo
from bigtrain.strategies.base import Strategy


def build_strategy(cfg: RunConfig, info: DistInfo, objective: Callable | None = None) -> Strategy:
    """The engine the config names, computing ``objective(model, batch) -> loss`` (default: the
    causal-LM loss). Imports only that engine (DeepSpeed is slow to import)."""
    name = cfg.strategy.name
    if name == "single":
        from bigtrain.strategies.single import SingleStrategy

        return SingleStrategy(cfg, info, objective)
    if name == "ddp":
        from bigtrain.strategies.ddp import DDPStrategy

        return DDPStrategy(cfg, info, objective)
    if name == "fsdp":
        from bigtrain.strategies.fsdp import FSDPStrategy

        return FSDPStrategy(cfg, info, objective)
    if name == "deepspeed":
        from bigtrain.strategies.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg, info, objective)
    raise ValueError(f"strategy.name: unknown strategy '{name}'")


def model_init_context(cfg: RunConfig, info: DistInfo) -> contextlib.AbstractContextManager:
    """Where the task builds its model: DeepSpeed ZeRO-3 builds a pretrained causal LM partitioned
    (see ``deepspeed.model_init_context``); elsewhere nothing changes."""
    if cfg.strategy.name == "deepspeed":
        from bigtrain.strategies.deepspeed import model_init_context as deepspeed_init

        return deepspeed_init(cfg, info)
    return contextlib.nullcontext()

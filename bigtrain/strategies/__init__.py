"""Training engines behind one interface (see ``base.Strategy``)."""

from __future__ import annotations

from bigtrain.config import RunConfig
from bigtrain.dist import DistInfo
from bigtrain.strategies.base import Strategy


def build_strategy(cfg: RunConfig, info: DistInfo) -> Strategy:
    """Import only the engine the config names (DeepSpeed is slow to import)."""
    name = cfg.strategy.name
    if name == "single":
        from bigtrain.strategies.single import SingleStrategy

        return SingleStrategy(cfg, info)
    if name == "ddp":
        from bigtrain.strategies.ddp import DDPStrategy

        return DDPStrategy(cfg, info)
    if name == "fsdp":
        from bigtrain.strategies.fsdp import FSDPStrategy

        return FSDPStrategy(cfg, info)
    if name == "deepspeed":
        from bigtrain.strategies.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg, info)
    raise ValueError(f"strategy.name: unknown strategy '{name}'")

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
    raise ValueError(f"strategy.name: '{name}' is not available yet")

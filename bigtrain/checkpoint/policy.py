"""When a checkpoint is written, and what the manager needs of the states it saves. Pure: no I/O."""

from __future__ import annotations

from typing import Any, Protocol

from bigtrain.config import CheckpointSection


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def save_decision(cfg: CheckpointSection, step: int, *, last: bool, stop: bool, time_due: bool) -> str | None:
    """Whether the end of ``step`` saves a checkpoint: ``"async"``, ``"sync"`` or None.

    A stop (preemption, Ctrl-C) saves if ``save_on_preempt``; the last step if ``save_final``;
    otherwise every ``every_steps`` steps or when ``every_minutes`` have passed. Saves before a
    process exits are synchronous; periodic ones follow ``checkpoint.async``.
    """
    if stop:
        return "sync" if cfg.save_on_preempt else None
    if last:
        return "sync" if cfg.save_final else None
    periodic = bool(cfg.every_steps and step % cfg.every_steps == 0) or time_due
    if not periodic:
        return None
    return "async" if cfg.async_ else "sync"

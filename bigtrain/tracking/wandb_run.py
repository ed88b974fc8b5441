"""Weights & Biases, imported only when enabled."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from bigtrain.config import WandbSection


class WandbRun:
    def __init__(self, cfg: WandbSection, run_name: str, run_dir: Path, config: dict[str, Any]):
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, name=run_name, dir=str(run_dir), config=config,
            mode=cfg.mode, tags=cfg.tags, id=_stable_id(run_dir), resume="allow",
        )

    def log(self, record: dict[str, Any], step: int) -> None:
        self.run.log(record, step=step)

    def close(self) -> None:
        self.run.finish()
        self._wandb.teardown()  # now: the training process exits without interpreter teardown


def _stable_id(run_dir: Path) -> str:
    """One W&B run per run directory, so a resumed run continues the same W&B run."""
    id_file = run_dir / "wandb_id.txt"
    if id_file.is_file():
        return id_file.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B ids are short [a-z0-9] strings
    id_file.write_text(run_id)
    return run_id

"""Checkpoints: atomic commit with a verified manifest, keep-last-k, latest-valid discovery.

Layout: ``RUN_DIR/checkpoints/step-N/`` holding the engine's files (written by the strategy),
``rng-<rank>.json`` per rank, ``trainer_state.json``, ``config.yaml`` and, written last,
``manifest.json`` (every file's size and sha256, world size, strategy, versions). A checkpoint
is written into ``step-N.tmp/`` and renamed into place only once complete, so a directory named
``step-N`` with a manifest whose files all check out is a valid checkpoint and nothing else is.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from bigtrain import dist
from bigtrain.data.shards import sha256_file
from bigtrain.dist import DistInfo

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for path in sorted([root, *[p for p in root.rglob("*") if p.is_dir()]]):
        _fsync_dir(path)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain JSON (no pickles)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    if not match:
        raise CheckpointError(f"{path}: not a checkpoint directory (expected a name like step-100)")
    return int(match.group(1))


def verify(path: Path) -> dict[str, Any]:
    """Return the manifest of checkpoint ``path`` or raise CheckpointError naming what is wrong."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{mpath}: corrupt manifest") from None
    for rel, meta in manifest.get("files", {}).items():
        fpath = path / rel
        if not fpath.is_file():
            raise CheckpointError(f"{fpath}: missing")
        if fpath.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{fpath}: size {fpath.stat().st_size}, manifest says {meta['bytes']} (truncated)")
        if sha256_file(fpath) != meta["sha256"]:
            raise CheckpointError(f"{fpath}: checksum mismatch (corrupted)")
    return manifest


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int, info: DistInfo, log: Callable[[str], None] = print):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.info = info
        self.log = log

    def checkpoints(self) -> list[Path]:
        """Committed checkpoint directories, newest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        return sorted(found, key=step_of, reverse=True)

    def latest_valid(self) -> Optional[Path]:
        for path in self.checkpoints():
            try:
                verify(path)
                return path
            except CheckpointError as err:
                self.log(f"checkpoint: skipping {path.name}: {err}")
        return None

    def save(self, step: int, strategy, trainer_state: dict[str, Any], config_yaml: str) -> Path:
        """Collective: every rank calls. Returns the committed directory."""
        final = self.root / f"step-{step}"
        tmp = self.root / f"step-{step}.tmp"
        if self.info.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        dist.barrier()
        strategy.save(tmp)
        (tmp / f"rng-{self.info.rank}.json").write_text(json.dumps(rng_state()))
        dist.barrier()
        if self.info.is_main:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
            (tmp / "config.yaml").write_text(config_yaml)
            files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = {
                "step": step,
                "world_size": self.info.world_size,
                "strategy": strategy.name,
                "created_s": round(time.time(), 3),
                "versions": {"torch": torch.__version__},
                "files": files,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync_dir(self.root)
            self._prune()
        dist.barrier()
        return final

    def _prune(self) -> None:
        for old in self.checkpoints()[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, strategy) -> dict[str, Any]:
        """Collective: restore engine state + this rank's RNG; return the trainer state."""
        manifest = verify(path)
        if manifest["strategy"] != strategy.name or manifest["world_size"] != self.info.world_size:
            raise CheckpointError(
                f"{path}: written by strategy '{manifest['strategy']}' on {manifest['world_size']} ranks; "
                f"this run uses '{strategy.name}' on {self.info.world_size}")
        strategy.load(path)
        rng_file = path / f"rng-{self.info.rank}.json"
        if rng_file.is_file():
            set_rng_state(json.loads(rng_file.read_text()))
        return json.loads((path / "trainer_state.json").read_text())

"""Checkpoint files: the layout, the manifest and its verification, RNG state, discovery.

Layout: ``RUN_DIR/checkpoints/step-N/`` holds the engine's files (written by the strategy on
every rank), ``rng-<rank>.json`` per rank, ``trainer_state.json`` (step, tokens, data-reader
position, ...), ``config.yaml`` and, written last, ``manifest.json`` (every file's size and
sha256, world size, strategy, versions). A directory named ``step-N`` whose manifest checks out is
a complete checkpoint; nothing else is trusted.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigtrain.data.shards import sha256_file

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Engines whose checkpoint files are interchangeable (full, unsharded model + optimizer state).
REPLICATED = {"single", "ddp"}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message is one line naming the file."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, permissions, ...); the previous one is kept."""


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


_saving_step: int | None = None  # the step being saved, for fault_point


def set_saving_step(step: int | None) -> None:
    global _saving_step
    _saving_step = step


def fault_point(name: str) -> None:
    """Fault injection for tests: ``BIGTRAIN_FAULT=<name>[@<step>]`` SIGKILLs this process right
    here (only while saving checkpoint ``<step>`` if one is given)."""
    want, _, at = os.environ.get("BIGTRAIN_FAULT", "").partition("@")
    if want == name and (not at or int(at) == _saving_step):
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for path in sorted([root, *[p for p in root.rglob("*") if p.is_dir()]]):
        fsync_dir(path)


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


def derived_dir(checkpoint: Path, kind: str) -> Path:
    """Where data derived from a checkpoint lives (e.g. DeepSpeed's universal conversion):
    hidden beside it as ``.step-N.<kind>``, never taken for a checkpoint, pruned with it."""
    return checkpoint.parent / f".{checkpoint.name}.{kind}"


def step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    if not match:
        raise CheckpointError(f"{path}: not a checkpoint directory (expected a name like step-100)")
    return int(match.group(1))


def versions() -> dict[str, str]:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        from importlib.metadata import version

        out["deepspeed"] = version("deepspeed")
        out["bigtrain"] = version("bigtrain")
    except Exception:  # not installed as a distribution
        pass
    return out


def write_manifest(directory: Path, step: int, world_size: int, strategy: str, **extra: Any) -> dict[str, Any]:
    """Write ``directory/manifest.json``: every file's size and sha256 (what :func:`verify` checks)."""
    files = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p != directory / MANIFEST}
    manifest = {"step": step, "world_size": world_size, "strategy": strategy, "created_s": round(time.time(), 3),
                "versions": versions(), **extra, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def list_checkpoints(root: Path) -> list[Path]:
    """Committed ``step-N`` directories under ``root``, newest first (validity not checked)."""
    if not Path(root).is_dir():
        return []
    found = [p for p in Path(root).iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=step_of, reverse=True)


def verify(path: Path, level: str = "checksum") -> dict[str, Any]:
    """Return the manifest of checkpoint ``path`` or raise CheckpointError naming what is wrong.

    ``level``: "checksum" re-hashes every file (detects bit flips); "size" only compares sizes.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{mpath}: corrupt manifest") from None
    for rel, meta in files.items():
        fpath = path / rel
        if not fpath.is_file():
            raise CheckpointError(f"{fpath}: missing")
        if fpath.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{fpath}: size {fpath.stat().st_size}, manifest says {meta['bytes']} (truncated)")
        if level == "checksum" and sha256_file(fpath) != meta["sha256"]:
            raise CheckpointError(f"{fpath}: checksum mismatch (corrupted)")
    return manifest


# Model keys that change parameter shapes or meaning (dropout, for one, does not).
_ARCHITECTURE_KEYS = ("name", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "vocab_size",
                      "max_seq_len", "tie_embeddings")


def model_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = [k for k in _ARCHITECTURE_KEYS if k in saved or k in current]
    return [f"model.{k} ({saved.get(k)!r} vs {current.get(k)!r})" for k in keys if saved.get(k) != current.get(k)]


def evaluation_at(path: Path) -> dict[str, Any] | None:
    """The evaluation a checkpoint carries, if it was made at the checkpoint's own step."""
    try:
        evals = json.loads((Path(path) / "trainer_state.json").read_text()).get("eval")
    except (OSError, ValueError):
        return None
    return evals if evals and evals.get("step") == step_of(Path(path)) else None


def best_checkpoint(paths: list[Path], metric: str, mode: str) -> tuple[Path, float] | None:
    """The checkpoint (and its value) with the best ``metric`` among ``paths`` evaluated at their step;
    the newest wins a tie."""
    scored = [(p, e[metric]) for p in paths if (e := evaluation_at(p)) and e.get(metric) is not None]
    if not scored:
        return None
    sign = 1 if mode == "min" else -1
    return min(scored, key=lambda pv: (sign * pv[1], -step_of(pv[0])))


def latest_valid(root: Path, level: str = "checksum", log=print) -> Path | None:
    """Newest checkpoint under ``root`` whose manifest verifies; logs why newer ones were rejected."""
    for path in list_checkpoints(root):
        try:
            verify(path, level)
            return path
        except CheckpointError as err:
            log(f"checkpoint: WARNING skipping {path.name}: {err}")
    return None


def resume_path(root: Path, resume: str, level: str = "checksum", log=print) -> Path | None:
    """What ``checkpoint.resume`` selects (auto | never | PATH; None: start fresh). Raises
    CheckpointError for an explicit path that does not verify (no silent fresh start)."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_valid(root, level, log)
    verify(Path(resume), level)
    return Path(resume)

"""Convert one checkpoint to another engine: read (readers.py), check against the model's
layout (state.py), write (writers.py), copy the engine-independent files, write a manifest;
all into a temporary directory renamed at the end, the source never written to."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bigtrain.checkpoint import MANIFEST, CheckpointError, derived_dir, verify, write_manifest
from bigtrain.checkpoint.files import REPLICATED, fsync_dir, fsync_tree
from bigtrain.convert.readers import read_state
from bigtrain.convert.state import check, model_layout, read_manifest
from bigtrain.convert.writers import write_state

# Engine files (any engine's): everything else in a checkpoint is engine-independent and copied.
ENGINE_FILES = {"model.safetensors", "optimizer.pt", "dcp", "deepspeed", "deepspeed_universal"}
TARGETS = ("single", "ddp", "fsdp", "deepspeed")

Engine = tuple[str, int | None]  # (strategy.name, ZeRO stage for deepspeed)


def label(engine: Engine) -> str:
    name, stage = engine
    return f"zero{stage}" if name == "deepspeed" else name


def checkpoint_engine(ckpt: Path) -> Engine:
    """The engine that wrote checkpoint ``ckpt`` (the stage from its config for DeepSpeed)."""
    name = read_manifest(ckpt).get("strategy")
    if name != "deepspeed":
        return name, None
    saved = yaml.safe_load((ckpt / "config.yaml").read_text()) or {}
    return name, int(((saved.get("strategy") or {}).get("deepspeed") or {}).get("stage", 2))


def same_engine(a: Engine, b: Engine) -> bool:
    """Whether a checkpoint of engine ``a`` loads as it is into engine ``b``."""
    return a == b or {a[0], b[0]} <= REPLICATED


def _target_config(ckpt: Path, target: Engine) -> tuple[dict, Any]:
    from bigtrain.config import ConfigError, validate

    tree = yaml.safe_load((ckpt / "config.yaml").read_text()) or {}
    strategy = tree.setdefault("strategy", {})
    strategy["name"] = target[0]
    if target[0] == "deepspeed":
        strategy.setdefault("deepspeed", {})["stage"] = target[1]
    try:
        return tree, validate(tree)
    except ConfigError as err:
        raise CheckpointError(f"{ckpt / 'config.yaml'}: as {label(target)}: {err}") from None


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[-1] if text else ''}"


def convert_checkpoint(src: Path, out: Path, target: Engine, world_size: int | None = None,
                       run_dir: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write checkpoint ``src`` as engine ``target``'s checkpoint ``out`` (which must not exist) for
    ``world_size`` ranks (default: the source's; 1 for single). Returns the new manifest. Raises
    CheckpointError (one line) when the source cannot be mapped; ``src`` is only read."""
    src, out = Path(src), Path(out)
    manifest = verify(src)
    source = checkpoint_engine(src)
    name, stage = target
    if name not in TARGETS:
        raise CheckpointError(f"--to {name}: not an engine (one of {', '.join(TARGETS)})")
    if name == "deepspeed" and stage not in (1, 2, 3):
        raise CheckpointError(f"{src}: cannot become a ZeRO-{stage} checkpoint: convert writes ZeRO stages 1-3 (a "
                              f"universal checkpoint, which ZeRO-0 cannot load)")
    if source == ("deepspeed", 0):
        raise CheckpointError(f"{src}: a ZeRO-0 checkpoint has no ZeRO partitions to convert (ds_to_universal)")
    world_size = world_size or (1 if name == "single" else manifest["world_size"])
    if name == "single" and world_size != 1:
        raise CheckpointError(f"{src}: single runs on 1 rank, not {world_size} (convert to ddp)")
    tree, cfg = _target_config(src, target)
    if cfg.optim.name != "adamw":
        raise CheckpointError(f"{src}: written with optim.name {cfg.optim.name}; convert carries AdamW's state "
                              f"only (step, exp_avg, exp_avg_sq per parameter)")
    if out.exists():
        raise CheckpointError(f"{out}: exists")
    layout = model_layout(src, run_dir)
    tmp, scratch = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.scratch")
    for stale in (tmp, scratch):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        scratch.mkdir(parents=True)
        try:
            state = read_state(source[0], src, layout, scratch)
        except CheckpointError:
            raise
        except Exception as err:  # the engine's files do not hold what their format promises
            raise CheckpointError(f"{src}: cannot read its {label(source)} state ({_one_line(err)})") from None
        check(state, layout, src)
        tmp.mkdir()
        write_state(name, state, layout, tmp, cfg, manifest["step"], world_size)
        keep_rng = world_size == manifest["world_size"]
        for path in sorted(src.iterdir()):
            if path.name in ENGINE_FILES or path.name in (MANIFEST, "config.yaml"):
                continue
            if path.name.startswith("rng-") and not keep_rng:  # as any resume on another world size
                continue
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, tmp / path.name)
        (tmp / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
        converted_from = {"path": str(src), "strategy": source[0], "world_size": manifest["world_size"]}
        if source[1] is not None:
            converted_from["stage"] = source[1]
        new = write_manifest(tmp, manifest["step"], world_size, name, converted_from=converted_from)
        fsync_tree(tmp)
        tmp.rename(out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"convert: {src} ({label(source)}, {manifest['world_size']} ranks) -> {out} ({label(target)}, "
        f"{world_size} ranks): {len(layout.params)} parameters with AdamW state")
    return new


def converted_for(path: Path, strategy, world_size: int, run_dir: Path, log: Callable[[str], None]) -> Path:
    """Rank 0, resuming: ``path`` if engine ``strategy`` loads it as it is, else its conversion
    (made once, beside it as ``.step-N.<engine>``, pruned with it)."""
    ds = getattr(strategy.cfg.strategy, "deepspeed", None)
    target = (strategy.name, ds.stage if strategy.name == "deepspeed" else None)
    source = checkpoint_engine(path)
    if same_engine(source, target):
        return path
    out = derived_dir(path, label(target))
    if out.is_dir():
        try:
            if read_manifest(out)["world_size"] == world_size:
                verify(out)
                return out
        except (CheckpointError, OSError, KeyError, ValueError):
            pass
        shutil.rmtree(out)
    log(f"checkpoint: converting {path.name} from {label(source)} to {label(target)} ({out.name})")
    convert_checkpoint(path, out, target, world_size, run_dir, log)
    return out

"""Checkpoints: atomic commit with a verified manifest, async writes, retention, latest-valid discovery.

Layout: ``RUN_DIR/checkpoints/step-N/`` holds the engine's files (written by the strategy on
every rank), ``rng-<rank>.json`` per rank, ``trainer_state.json`` (step, tokens, data-reader
position, ...), ``config.yaml`` and, written last, ``manifest.json`` (every file's size and
sha256, world size, strategy, versions).

Commit protocol: everything is written into ``step-N.tmp/``; when every rank has finished, rank 0
computes the manifest, fsyncs the files and the directory, and renames ``step-N.tmp`` to
``step-N``. So a directory named ``step-N`` whose manifest checks out is a complete checkpoint,
and a crash at any moment leaves the previous checkpoints untouched. Readers never trust
anything else: leftover ``*.tmp`` directories are ignored and removed by the next save.

Async (``checkpoint.async``): the engine writes in the background (DCP ``async_save`` for FSDP, a
writer thread for the others) and rank 0 commits in a thread; training continues. At most one
save is in flight: a new save, the end of training, or a preemption first waits for it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as tdist
import yaml

from bigtrain import dist
from bigtrain.config import CheckpointSection
from bigtrain.data.shards import sha256_file
from bigtrain.dist import DistInfo

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Engines whose checkpoint files are interchangeable (full, unsharded model + optimizer state).
_REPLICATED = {"single", "ddp"}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message is one line naming the file."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, permissions, ...); the previous one is kept."""


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


_saving_step: Optional[int] = None  # the step being saved, for fault_point


def fault_point(name: str) -> None:
    """Fault injection for tests: ``BIGTRAIN_FAULT=<name>[@<step>]`` SIGKILLs this process right
    here (only while saving checkpoint ``<step>`` if one is given)."""
    want, _, at = os.environ.get("BIGTRAIN_FAULT", "").partition("@")
    if want == name and (not at or int(at) == _saving_step):
        os.kill(os.getpid(), signal.SIGKILL)


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


def derived_dir(checkpoint: Path, kind: str) -> Path:
    """Where data derived from a checkpoint lives (e.g. DeepSpeed's universal conversion):
    hidden beside it as ``.step-N.<kind>``, never taken for a checkpoint, pruned with it."""
    return checkpoint.parent / f".{checkpoint.name}.{kind}"


def step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    if not match:
        raise CheckpointError(f"{path}: not a checkpoint directory (expected a name like step-100)")
    return int(match.group(1))


def _versions() -> dict[str, str]:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        from importlib.metadata import version

        out["deepspeed"] = version("deepspeed")
        out["bigtrain"] = version("bigtrain")
    except Exception:  # not installed as a distribution
        pass
    return out


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


def _model_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = [k for k in _ARCHITECTURE_KEYS if k in saved or k in current]
    return [f"model.{k} ({saved.get(k)!r} vs {current.get(k)!r})" for k in keys if saved.get(k) != current.get(k)]


class _Pending:
    """A save whose files are still being written (async)."""

    def __init__(self, step: int, tmp: Path, handle: Future, strategy: str, trainer_state: dict, config_yaml: str):
        self.step, self.tmp, self.handle, self.strategy = step, tmp, handle, strategy
        self.trainer_state, self.config_yaml = trainer_state, config_yaml
        self.started = time.perf_counter()


def done_future() -> Future:
    fut: Future = Future()
    fut.set_result(None)
    return fut


class CheckpointManager:
    def __init__(self, run_dir: Path, cfg: CheckpointSection, info: DistInfo,
                 log: Callable[[str], None] = print, extra_files: tuple[Path, ...] = ()):
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = cfg
        self.info = info
        self.log = log
        self.extra_files = extra_files  # copied into every checkpoint (e.g. the tokenizer)
        self._pending: Optional[_Pending] = None
        self._commit_thread: Optional[threading.Thread] = None  # rank 0 only
        self._committing = False  # every rank: an async commit was started and not yet reported
        self._commit_error: Optional[BaseException] = None
        self.last_committed: Optional[Path] = None
        self._said_sync = False

    # -- discovery ------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Committed checkpoint directories, newest first."""
        return list_checkpoints(self.root)

    def latest_valid(self) -> Optional[Path]:
        """Newest checkpoint whose manifest verifies; logs why newer ones were rejected."""
        for path in self.checkpoints():
            try:
                verify(path, self.cfg.verify)
                return path
            except CheckpointError as err:
                self.log(f"checkpoint: WARNING skipping {path.name}: {err}")
        return None

    def resume_path(self) -> Optional[Path]:
        """What ``checkpoint.resume`` selects (None: start fresh). Raises for a bad explicit path."""
        if self.cfg.resume == "never":
            return None
        if self.cfg.resume == "auto":
            return self.latest_valid()
        path = Path(self.cfg.resume)
        verify(path, self.cfg.verify)  # an explicit path must be valid: no silent fresh start
        return path

    def agreed_resume_path(self) -> Optional[Path]:
        """Collective: rank 0 chooses (and verifies) the checkpoint to resume from; all ranks
        get the same answer, or the same CheckpointError."""
        choice: tuple[str, Any] = ("ok", None)
        if self.info.is_main:
            try:
                choice = ("ok", self.resume_path())
            except CheckpointError as err:
                choice = ("error", str(err))
        status, value = dist.broadcast_object(choice)
        if status == "error":
            raise CheckpointError(value)
        return value

    # -- saving ---------------------------------------------------------------------------
    def save(self, step: int, strategy, trainer_state: dict[str, Any], config_yaml: str,
             asynchronous: bool = False) -> None:
        """Collective: every rank calls. Starts (async) or completes (sync) checkpoint ``step``."""
        global _saving_step
        self.wait()  # at most one save in flight
        _saving_step = step
        tmp = self.root / f"step-{step}.tmp"
        ok = True
        error = ""
        if self.info.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.glob("step-*.tmp"):
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir()
            except OSError as err:
                ok, error = False, self._describe(err)
        ok = self._all_ok(ok)
        handle: Future = done_future()
        if asynchronous and not hasattr(strategy, "async_save"):
            asynchronous = False
            if not self._said_sync:
                self._said_sync = True
                if self.info.is_main:
                    self.log(f"checkpoint: {strategy.name} has no background writer; checkpoint.async saves synchronously")
        if ok:
            try:
                if asynchronous:
                    handle = strategy.async_save(tmp)
                else:
                    strategy.save(tmp)
                (tmp / f"rng-{self.info.rank}.json").write_text(json.dumps(rng_state()))
            except Exception as err:  # torch.save reports a full disk as RuntimeError
                ok, error = False, self._describe(err)
        if not self._all_ok(ok):
            self._failed(step, tmp, error or "another rank failed to write its part")
            return
        self._pending = _Pending(step, tmp, handle, strategy.name, dict(trainer_state, step=step), config_yaml)
        if not asynchronous:
            self.wait()
            return
        if self.info.is_main:
            self.log(f"checkpoint: step-{step} writing in the background")
        fault_point("checkpoint-in-flight")

    def poll(self) -> None:
        """Collective while a save is in flight (no-op otherwise): commit it once every rank's
        writes are done; report the commit's outcome once rank 0's commit thread has finished."""
        if self._pending is not None:
            if self._all_ok(self._pending.handle.done()):
                self._finish_pending(block=False)
        elif self._committing:
            thread_done = self._commit_thread is None or not self._commit_thread.is_alive()
            if self._all_ok(thread_done):
                self._join_commit()

    def wait(self) -> None:
        """Collective: block until the in-flight save (if any) is committed."""
        if self._pending is not None:
            self._finish_pending(block=True)
        if self._committing:
            self._join_commit()

    def _join_commit(self) -> None:
        if self._commit_thread is not None:
            self._commit_thread.join()
            self._commit_thread = None
        self._committing = False
        self._raise_commit_error()

    def _finish_pending(self, block: bool) -> None:
        pending, self._pending = self._pending, None
        assert pending is not None
        ok, error = True, ""
        try:
            pending.handle.result()
        except Exception as err:  # the engine's writer failed on this rank
            ok, error = False, self._describe(err)
        if not self._all_ok(ok):
            self._failed(pending.step, pending.tmp, error or "another rank failed to write its part")
            return
        if block:
            if self.info.is_main:
                self._commit(pending)
            self._raise_commit_error()
        else:
            self._committing = True
            if self.info.is_main:
                self._commit_thread = threading.Thread(target=self._commit, args=(pending,), daemon=True)
                self._commit_thread.start()

    def _commit(self, pending: _Pending) -> None:
        """Rank 0: manifest, fsync, rename, prune. Runs in a thread for async saves."""
        tmp, final = pending.tmp, self.root / f"step-{pending.step}"
        try:
            (tmp / "trainer_state.json").write_text(json.dumps(pending.trainer_state, indent=2))
            (tmp / "config.yaml").write_text(pending.config_yaml)
            for extra in self.extra_files:
                if Path(extra).is_file():
                    shutil.copy(extra, tmp / Path(extra).name)
            fault_point("checkpoint-before-manifest")
            files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            manifest = {
                "step": pending.step,
                "world_size": self.info.world_size,
                "strategy": pending.strategy,
                "created_s": round(time.time(), 3),
                "versions": _versions(),
                "files": files,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            _fsync_tree(tmp)
            fault_point("checkpoint-before-rename")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            _fsync_dir(self.root)
            self.last_committed = final
            self.log(f"checkpoint: saved {final} ({time.perf_counter() - pending.started:.1f}s)")
            self._prune()
        except Exception as err:
            shutil.rmtree(tmp, ignore_errors=True)
            self._commit_error = CheckpointSaveError(self._save_failed_message(pending.step, self._describe(err)))

    def _raise_commit_error(self) -> None:
        """Rank 0's commit result, agreed by all ranks (collective when distributed)."""
        if self._all_ok(self._commit_error is None):
            return
        err, self._commit_error = self._commit_error, None
        message = str(err) if err else "checkpoint: commit failed on rank 0"
        self._report_failure(message)

    def _describe(self, err: BaseException) -> str:
        """One line: the error, plus the free space where it matters (a full disk often surfaces
        as an obscure write error)."""
        text = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        try:
            free = shutil.disk_usage(self.root if self.root.exists() else self.root.parent).free
        except OSError:
            return text
        if getattr(err, "errno", None) == 28 or free < 64 * 2**20:
            text += f"; disk full? only {free / 2**20:.1f} MiB free on {self.root}"
        return text

    def _failed(self, step: int, tmp: Path, error: str) -> None:
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self._report_failure(self._save_failed_message(step, error))

    def _save_failed_message(self, step: int, error: str) -> str:
        previous = self.last_committed or next(iter(self.checkpoints()), None)
        kept = f"previous checkpoint {previous} kept" if previous else "no previous checkpoint"
        return f"checkpoint: saving step-{step} failed ({error}); {kept}"

    def _report_failure(self, message: str) -> None:
        if self.cfg.on_save_error == "stop":
            raise CheckpointSaveError(message)
        self.log(f"{message}; training continues (checkpoint.on_save_error=continue)")

    def _all_ok(self, ok: bool) -> bool:
        if not (tdist.is_initialized() and tdist.get_world_size() > 1):
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.info.device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
        return bool(flag.item())

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` plus every step that is a multiple of ``keep_every``."""
        for old in self.checkpoints()[self.cfg.keep_last:]:
            if self.cfg.keep_every and step_of(old) % self.cfg.keep_every == 0:
                continue
            shutil.rmtree(old, ignore_errors=True)
            for derived in self.root.glob(derived_dir(old, "*").name):
                shutil.rmtree(derived, ignore_errors=True)

    # -- loading --------------------------------------------------------------------------
    def load(self, path: Path, strategy, model_config: dict[str, Any]) -> dict[str, Any]:
        """Collective: restore engine state + this rank's RNG; return the trainer state."""
        path = Path(path)
        manifest = verify(path, "size")  # content was verified when the path was chosen
        saved_cfg = yaml.safe_load((path / "config.yaml").read_text()) or {}
        diffs = _model_differences(saved_cfg.get("model", {}), model_config)
        if diffs:
            raise CheckpointError(f"{path}: written for a different model: {', '.join(diffs[:3])}")
        saved_strategy = manifest.get("strategy")
        if saved_strategy != strategy.name and not {saved_strategy, strategy.name} <= _REPLICATED:
            raise CheckpointError(f"{path}: written by strategy '{saved_strategy}'; this run uses "
                                  f"'{strategy.name}' (export it to Hugging Face format to switch engines)")
        strategy.load(path)
        rng_file = path / f"rng-{self.info.rank}.json"
        if rng_file.is_file() and manifest["world_size"] == self.info.world_size:
            set_rng_state(json.loads(rng_file.read_text()))
        self.last_committed = path
        return json.loads((path / "trainer_state.json").read_text())

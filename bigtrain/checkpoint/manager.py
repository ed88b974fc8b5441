"""The checkpoint manager: when to save (the policy), atomic commits, async writes, retention,
resume.

The training loop makes one call per step, :meth:`CheckpointManager.step_end`, and the manager
decides (see :func:`save_decision`): every ``checkpoint.every_steps`` steps or ``every_minutes``
minutes, at the last step (``save_final``), and when the run is told to stop (preemption, Ctrl-C:
``save_on_preempt``). It saves what was attached to it: the engine's model and optimizer state,
the data reader's position, the trainer's counters, and each rank's RNG.

Commit protocol: everything is written into ``step-N.tmp/``; when every rank has finished, rank 0
computes the manifest, fsyncs the files and the directory, and renames ``step-N.tmp`` to
``step-N``. A crash at any moment leaves the previous checkpoints untouched; leftover ``*.tmp``
directories are ignored and removed by the next save (or by :meth:`close` after an error).

Async (``checkpoint.async``): the engine writes in the background (DCP ``async_save`` for FSDP, a
writer thread for single/DDP; DeepSpeed saves synchronously and says so) and rank 0 commits in a
thread; training continues. At most one save is in flight: a new save, the end of training, or a
stop first waits for it.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import yaml

from bigtrain import dist
from bigtrain.checkpoint.files import (
    REPLICATED,
    CheckpointError,
    CheckpointSaveError,
    best_checkpoint,
    derived_dir,
    fault_point,
    fsync_dir,
    fsync_tree,
    list_checkpoints,
    model_differences,
    resume_path,
    rng_state,
    set_rng_state,
    set_saving_step,
    step_of,
    verify,
    write_manifest,
)
from bigtrain.checkpoint.policy import Stateful, save_decision
from bigtrain.config import CheckpointSection
from bigtrain.dist import DistInfo


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
        self._pending: _Pending | None = None
        self._commit_thread: threading.Thread | None = None  # rank 0 only
        self._committing = False  # every rank: an async commit was started and not yet reported
        self._commit_error: BaseException | None = None
        self.last_committed: Path | None = None
        self._said_sync = False
        # what every checkpoint holds (attach)
        self.strategy = None
        self.states: dict[str, Stateful] = {}
        self.config_yaml, self.model_config = "", {}
        self._last_save_time = time.monotonic()

    # -- the training loop's interface ------------------------------------------------------
    def attach(self, strategy, config_yaml: str, model_config: dict[str, Any], **states: Stateful) -> None:
        """What every checkpoint saves and a resume restores: the engine's state, the run's
        config, and named states. ``trainer``'s keys go at the top of ``trainer_state.json``
        (step, tokens_seen, ...); any other state goes under its name (``data``: the reader)."""
        self.strategy, self.config_yaml, self.model_config, self.states = strategy, config_yaml, model_config, states

    def resume(self) -> Path | None:
        """Collective: load the checkpoint ``checkpoint.resume`` selects into the engine and the
        attached states; None when the run starts fresh. A state the checkpoint lacks (written
        before it existed) is asked to ``seek(step)`` instead."""
        path = self.agreed_resume_path()
        if path is None:
            return None
        path = self.converted(path)
        blob = self.load(path, self.strategy, self.model_config)
        for name, state in self.states.items():
            if name == "trainer":
                state.load_state_dict(blob)
            elif name in blob:
                state.load_state_dict(blob[name])
            else:
                state.seek(blob["step"])
        return path

    def time_due(self) -> bool:
        """This rank's clock: ``every_minutes`` have passed since the last save (ranks must agree
        on it before :meth:`step_end`; the loop's stop poll carries it)."""
        every_s = self.cfg.every_minutes * 60
        return every_s > 0 and time.monotonic() - self._last_save_time >= every_s

    def step_end(self, step: int, *, last: bool, stop: bool = False, time_due: bool = False) -> bool:
        """Collective, once per optimizer step: commit a finished background save, then save
        ``step`` if :func:`save_decision` says so. Returns whether a save was made or started."""
        self.poll()
        decision = save_decision(self.cfg, step, last=last, stop=stop, time_due=time_due)
        if decision is None:
            return False
        state: dict[str, Any] = {}
        for name, source in self.states.items():
            if name == "trainer":
                state.update(source.state_dict())
            else:
                state[name] = source.state_dict()
        self.save(step, self.strategy, state, self.config_yaml, asynchronous=decision == "async")
        self._last_save_time = time.monotonic()
        return True

    def close(self, *, error: bool = False) -> None:
        """The run is over: wait for the save in flight and commit it. After an error (other
        ranks may be gone) nothing collective runs: this rank's writes are awaited (up to a
        minute), and rank 0 removes every uncommitted ``step-*.tmp`` directory."""
        if not error:
            self.wait()
            return
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.handle.result(timeout=60)
            except (Exception, FutureTimeout):  # the run is failing already; its error is the one to report
                pass
        if self._commit_thread is not None:
            self._commit_thread.join(timeout=60)
        if self.info.is_main and self.root.is_dir():
            for stale in self.root.glob("step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)

    # -- discovery ------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Committed checkpoint directories, newest first."""
        return list_checkpoints(self.root)

    def agreed_resume_path(self) -> Path | None:
        """Collective: rank 0 chooses (and verifies) the checkpoint to resume from; all ranks
        get the same answer, or the same CheckpointError."""
        choice: tuple[str, Any] = ("ok", None)
        if self.info.is_main:
            try:
                choice = ("ok", resume_path(self.root, self.cfg.resume, self.cfg.verify, self.log))
            except CheckpointError as err:
                choice = ("error", str(err))
        status, value = dist.broadcast_object(choice)
        if status == "error":
            raise CheckpointError(value)
        return value

    def converted(self, path: Path) -> Path:
        """Collective: ``path``, or (written by another engine or ZeRO stage) its conversion to this
        run's engine, made by rank 0 beside it (``.step-N.<engine>``) while the others wait."""
        from bigtrain.convert import converted_for

        return dist.run_on_main(lambda: converted_for(path, self.strategy, self.info.world_size, self.root.parent,
                                                      self.log), self.info.is_main)

    # -- saving ---------------------------------------------------------------------------
    def save(self, step: int, strategy, trainer_state: dict[str, Any], config_yaml: str,
             asynchronous: bool = False) -> None:
        """Collective: every rank calls. Starts (async) or completes (sync) checkpoint ``step``."""
        self.wait()  # at most one save in flight
        set_saving_step(step)
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
                    self.log(f"checkpoint: {strategy.name} has no background writer; checkpoint.async saves "
                             f"synchronously")
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
            write_manifest(tmp, pending.step, self.info.world_size, pending.strategy)
            fsync_tree(tmp)
            fault_point("checkpoint-before-rename")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            fsync_dir(self.root)
            self.last_committed = final
            self.log(f"checkpoint: saved {final} ({time.perf_counter() - pending.started:.1f}s)")
            self._prune()
            best = self.best()
            if best and best[0] == final:
                self.log(f"checkpoint: best so far: {final.name} ({self.cfg.keep_best.metric} {best[1]:.4f})")
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
        """Keep the newest ``keep_last``, every step that is a multiple of ``keep_every``, and the best
        by ``keep_best``."""
        best = self.best()
        for old in self.checkpoints()[self.cfg.keep_last:]:
            if (self.cfg.keep_every and step_of(old) % self.cfg.keep_every == 0) or (best and old == best[0]):
                continue
            shutil.rmtree(old, ignore_errors=True)
            for derived in self.root.glob(derived_dir(old, "*").name):
                shutil.rmtree(derived, ignore_errors=True)

    def best(self) -> tuple[Path, float] | None:
        """The committed checkpoint with the best ``checkpoint.keep_best`` metric, and its value."""
        keep = self.cfg.keep_best
        return best_checkpoint(self.checkpoints(), keep.metric, keep.mode) if keep else None

    # -- loading --------------------------------------------------------------------------
    def load(self, path: Path, strategy, model_config: dict[str, Any]) -> dict[str, Any]:
        """Collective: restore engine state + this rank's RNG; return the trainer state."""
        path = Path(path)
        manifest = verify(path, "size")  # content was verified when the path was chosen
        saved_cfg = yaml.safe_load((path / "config.yaml").read_text()) or {}
        diffs = model_differences(saved_cfg.get("model", {}), model_config)
        if diffs:
            raise CheckpointError(f"{path}: written for a different model: {', '.join(diffs[:3])}")
        saved_strategy = manifest.get("strategy")
        if saved_strategy != strategy.name and not {saved_strategy, strategy.name} <= REPLICATED:
            raise CheckpointError(f"{path}: written by strategy '{saved_strategy}'; this run uses "
                                  f"'{strategy.name}'")
        saved_optim, optim = (saved_cfg.get("optim") or {}).get("name", "adamw"), strategy.cfg.optim.name
        if saved_optim != optim:
            raise CheckpointError(f"{path}: written with optim.name {saved_optim}; this run uses {optim} (its state "
                                  f"cannot take over another optimizer's: export the weights to start anew)")
        strategy.load(path)
        rng_file = path / f"rng-{self.info.rank}.json"
        if rng_file.is_file() and manifest["world_size"] == self.info.world_size:
            set_rng_state(json.loads(rng_file.read_text()))
        self.last_committed = path
        return json.loads((path / "trainer_state.json").read_text())

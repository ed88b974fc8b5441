"""Weights & Biases, imported only when enabled. W&B never stops training: an unreachable server
means an offline W&B run (synced later), and a failing call is reported once and W&B is dropped."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bigtrain.config import WandbSection

REACH_TIMEOUT_S = 3.0


class WandbRun:
    def __init__(self, cfg: WandbSection, run_name: str, run_dir: Path, config: dict[str, Any],
                 log: Callable[[str], None] = print):
        import wandb

        self._wandb, self._log, self.run = wandb, log, None
        args = dict(project=cfg.project, entity=cfg.entity, name=run_name, dir=str(run_dir), config=config,
                    tags=cfg.tags, id=_stable_id(run_dir), resume="allow")
        mode = cfg.mode
        sync = f"sync it later with `wandb sync {run_dir / 'wandb'}/offline-run-*`"
        if mode == "online":
            try:  # WANDB_BASE_URL, else `wandb login --host`'s setting, else api.wandb.ai
                base_url = wandb.setup().settings.base_url
            except Exception:
                base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
            why = unreachable(base_url)
            if why:
                log(f"warning: W&B server {base_url} is unreachable ({why}): logging W&B offline; {sync}")
                mode = "offline"
        try:
            self.run = wandb.init(mode=mode, **args)
            return
        except Exception as err:
            if mode != "online":
                log(f"warning: W&B is off for this run: wandb.init failed ({_one_line(err)}); "
                    f"metrics.jsonl and eval.jsonl have every record")
                return
            log(f"warning: W&B online failed ({_one_line(err)}): logging W&B offline; {sync}")
        try:
            wandb.teardown()  # the failed run still holds its id in the W&B service
            self.run = wandb.init(mode="offline", **args)
        except Exception as err:
            log(f"warning: W&B is off for this run: offline wandb.init failed too ({_one_line(err)})")

    def log(self, record: dict[str, Any], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(record, step=step)
        except Exception as err:
            self._log(f"warning: W&B log failed at step {step} ({_one_line(err)}): W&B is off from here on; "
                      f"training goes on and metrics.jsonl and eval.jsonl have every record")
            self._finish()

    def close(self) -> None:
        if self.run is not None:
            self._finish()

    def _finish(self) -> None:
        run, self.run = self.run, None
        try:
            run.finish()
        except Exception as err:
            self._log(f"warning: W&B finish failed ({_one_line(err)})")
        try:
            self._wandb.teardown()  # now: the training process exits without interpreter teardown
        except Exception:
            pass


def unreachable(base_url: str, timeout: float = REACH_TIMEOUT_S) -> str | None:
    """Why ``base_url`` (or the proxy the environment names for it) takes no TCP connection within
    ``timeout`` seconds, or None when it does. Name lookup counts against the timeout too."""
    url = urllib.parse.urlsplit(base_url)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return f"no host in {base_url!r}"
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or host, proxy_url.port or 80
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"{host}:{port}: {err.strerror or err}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"{host}:{port}: no answer within {timeout:.0f} s"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def _stable_id(run_dir: Path) -> str:
    """One W&B run per run directory, so a resumed run continues the same W&B run."""
    id_file = run_dir / "wandb_id.txt"
    if id_file.is_file():
        return id_file.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B ids are short [a-z0-9] strings
    id_file.write_text(run_id)
    return run_id

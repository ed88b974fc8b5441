"""Shared test fixtures: offline HF, a tiny real-text corpus, and a runner for the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY_SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"
TEST_CONFIG = ROOT / "tests" / "configs" / "gpt-test.yaml"

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(OFFLINE_ENV)


def pytest_collection_modifyitems(config, items):
    if not TINY_SHAKESPEARE.is_file():
        skip = pytest.mark.skip(reason=f"test corpus {TINY_SHAKESPEARE} is missing")
        for item in items:
            if "tiny_text" in getattr(item, "fixturenames", ()):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_text() -> Path:
    return TINY_SHAKESPEARE


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One prepared-data cache for the whole session (preparing is cached by content hash)."""
    return tmp_path_factory.mktemp("bigtrain-cache")


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``bigtrain ARGS`` as a user would, in a subprocess."""
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or ROOT)


def count_opens(monkeypatch, *paths: Path) -> dict[Path, int]:
    """How often each of ``paths`` is opened from now on (``builtins.open`` and ``io.open``, which
    pathlib uses), counted in the returned dict as it happens."""
    import builtins
    import io

    real, targets = io.open, {os.path.realpath(p): Path(p) for p in paths}
    opens = {Path(p): 0 for p in paths}

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) in targets:
            opens[targets[os.path.realpath(file)]] += 1
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)
    return opens


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train_args(run_dir: Path, cache: Path, tiny_text: Path, *extra: str) -> list[str]:
    """``train`` arguments for a tiny, fast run on real text."""
    return ["train", str(TEST_CONFIG), f"run.dir={run_dir}", f"data.cache_dir={cache}", f"data.path={tiny_text}", *extra]

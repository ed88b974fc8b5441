"""`bigtrain launch` for real: torchrun with a c10d rendezvous (2 local ranks, two "nodes" on one
machine, restarts after a killed worker, SIGTERM -> checkpoint -> exit 75) and the DeepSpeed launcher."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import OFFLINE_ENV, ROOT, TEST_CONFIG, read_jsonl
from launcher.torchrun import free_port

pytestmark = [pytest.mark.dist]

ENV = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}


def launch_args(run_dir: Path, cache: Path, tiny_text: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "launcher.cli", "launch", str(TEST_CONFIG), f"run.dir={run_dir}",
            f"data.cache_dir={cache}", f"data.path={tiny_text}", "train.sample_tokens=0", *extra]


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


class Watched:
    """A launcher process whose merged output is collected line by line."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                                     cwd=ROOT, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(self.lines[-40:]))

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code, "".join(self.lines)


@pytest.mark.slow
def test_launch_trains_on_two_local_ranks_with_fsdp(tmp_path, cache_dir, tiny_text):
    run_dir = tmp_path / "run"
    out = ok(run(launch_args(run_dir, cache_dir, tiny_text, "--nproc-per-node", "2", "strategy.name=fsdp")))
    assert "strategy fsdp x 2" in out, out[-3000:]
    assert "rank 1/2 (local 1)" in out
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 21))


@pytest.mark.slow
def test_two_launch_processes_with_one_c10d_endpoint_train_one_job(tmp_path, cache_dir, tiny_text):
    """Two "nodes" on one machine: --nnodes 2 --node-rank {0,1} with the same endpoint."""
    run_dir = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint, "strategy.name=ddp"]
    nodes = [Watched(launch_args(run_dir, cache_dir, tiny_text, *common, "--node-rank", str(r))) for r in (0, 1)]
    results = [node.finish() for node in nodes]
    for code, out in results:
        assert code == 0, out[-4000:]
    both = results[0][1] + results[1][1]
    assert "rank 0/2" in both and "rank 1/2" in both
    assert "strategy ddp x 2" in both
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 21))


def test_launch_restarts_a_killed_worker_which_resumes(tmp_path, cache_dir, tiny_text):
    """--max-restarts works because the rendezvous is c10d at an explicit endpoint."""
    run_dir = tmp_path / "run"
    node = Watched(launch_args(run_dir, cache_dir, tiny_text, "--max-restarts", "1", "train.max_steps=60",
                               "checkpoint.every_steps=5"))
    pid = int(node.wait_for(r"rank 0/1 \(local 0\) on host .*pid (\d+)").group(1))
    node.wait_for(r"saved .*step-10")
    os.kill(pid, signal.SIGKILL)
    code, out = node.finish()
    assert code == 0, out[-4000:]
    assert len(re.findall(r"bigtrain agent: rank 0/1", out)) == 2  # started twice
    assert re.search(r"resumed from .*step-(10|15|20) at step", out), out[-3000:]
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["step"] == 60


def test_sigterm_to_the_launcher_checkpoints_and_exits_with_requeue_code(tmp_path, cache_dir, tiny_text):
    run_dir = tmp_path / "run"
    node = Watched(launch_args(run_dir, cache_dir, tiny_text, "train.max_steps=2000"))
    node.wait_for(r"step +3 \|")
    node.proc.send_signal(signal.SIGTERM)  # to the agent only: it forwards to the ranks
    code, out = node.finish()
    assert code == 75, out[-3000:]
    assert "preempted (SIGTERM)" in out
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0].startswith("step-"), saved


@pytest.mark.slow
def test_launch_through_the_deepspeed_launcher(tmp_path, cache_dir, tiny_text):
    run_dir = tmp_path / "run"
    out = ok(run(launch_args(run_dir, cache_dir, tiny_text, "--nproc-per-node", "2", "strategy.name=deepspeed",
                             "resources.launcher=deepspeed", "train.max_steps=8")))
    assert "strategy deepspeed x 2" in out, out[-3000:]
    assert (run_dir / "hostfile-node0").read_text() == "localhost slots=2\n"
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["step"] == 8

"""A hung rank becomes a clear error: heartbeats, the watchdog's stack dumps and the line that
names the rank that did not arrive; `bigtrain status` flags it while it hangs. Real 2-rank runs."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from bigtrain.heartbeat import laggards
from conftest import run_cli, train_args
from test_checkpoint import start, wait_for_step

pytestmark = [pytest.mark.dist, pytest.mark.slow]

TIMEOUT_S = 20


def test_a_stalled_rank_is_named_dumped_and_the_run_ends(tmp_path, cache_dir, tiny_text):
    run_dir = tmp_path / "run"
    argv = train_args(run_dir, cache_dir, tiny_text, "train.max_steps=50", "train.sample_tokens=0",
                      "strategy.name=ddp", "--nproc", "2", f"train.collective_timeout_s={TIMEOUT_S}")
    proc = start(argv, env={"BIGTRAIN_FAULT": "stall@4", "BIGTRAIN_FAULT_RANK": "1"})
    wait_for_step(run_dir, 3, proc)
    stalled_at = time.time()
    time.sleep(8)  # rank 1 sleeps in step 4; rank 0 waits for it in the gradient all-reduce
    status = run_cli("status", str(run_dir))
    assert status.returncode == 0, status.stderr
    lines = {ln.split(":")[0].strip(): ln for ln in status.stdout.splitlines() if ln.strip().startswith("rank ")}
    assert "step 4 data" in lines["rank 1"] and "STALLED (behind the others)" in lines["rank 1"], status.stdout
    assert "step 4 forward-backward" in lines["rank 0"] and "waiting" in lines["rank 0"], status.stdout

    out, _ = proc.communicate(timeout=TIMEOUT_S + 90)
    ended = time.time() - stalled_at
    assert proc.returncode != 0
    assert ended < TIMEOUT_S + 60, ended  # no hang: the watchdog ends it soon after the timeout
    report = [ln for ln in out.splitlines() if ln.startswith("error: hang: rank 0")]
    assert report, out[-3000:]
    assert "did not arrive: rank 1 (at step 4 data" in report[0], report[0]
    assert "the others wait in step 4 (forward-backward)" in report[0]
    for rank in (0, 1):
        stacks = (run_dir / "hang" / f"rank-{rank}-stacks.txt").read_text()
        assert "Thread" in stacks and "most recent call first" in stacks
    assert "injected_faults" in (run_dir / "hang" / "rank-1-stacks.txt").read_text()  # where rank 1 sleeps
    assert not subprocess.run(["pgrep", "-f", str(run_dir)], capture_output=True, text=True).stdout.strip()


def test_a_rank_that_cannot_stop_after_preemption_says_where_before_the_launcher_kills_it(
        tmp_path, cache_dir, tiny_text):
    """SIGTERM reaches both ranks while rank 1 hangs and rank 0 waits for it in a collective (its
    Python handler cannot run there). 25 s later (signal_grace_s 30, less 5), still before the
    agent's SIGKILL, each rank dumps its stacks and exits 75: the job is requeued, not lost."""
    run_dir = tmp_path / "run"
    argv = train_args(run_dir, cache_dir, tiny_text, "train.max_steps=50", "train.sample_tokens=0",
                      "strategy.name=ddp", "--nproc", "2", "resources.signal_grace_s=30")
    proc = start(argv, env={"BIGTRAIN_FAULT": "stall@4", "BIGTRAIN_FAULT_RANK": "1"})
    wait_for_step(run_dir, 3, proc)
    time.sleep(2)  # rank 1 sleeps in step 4; rank 0 waits for it (collective_timeout_s: 600 s)
    proc.send_signal(signal.SIGTERM)  # to the agent: it forwards it to every rank
    signalled = time.time()
    out, _ = proc.communicate(timeout=90)
    ended = time.time() - signalled
    assert proc.returncode == 75, out[-3000:]
    assert 24 < ended < 35, ended  # the 25 s deadline (the agent would kill at 30 s: exit 137, not 75)
    assert "forcefully exiting" not in out, out[-3000:]
    for rank in (0, 1):
        report = [ln for ln in out.splitlines() if ln.startswith(f"error: hang: rank {rank} did not save and exit "
                                                                 f"within 25s of its stop signal")]
        assert report, out[-3000:]
    assert "in step 4 (forward-backward)" in report[0] or "in step 4 (data)" in report[0], report[0]
    stacks = (run_dir / "hang" / "rank-1-stacks.txt").read_text()
    assert "injected_faults" in stacks and "did not save and exit" in stacks
    assert not (run_dir / "checkpoints").is_dir() or not any((run_dir / "checkpoints").glob("step-*[0-9]"))


def test_heartbeats_of_a_finished_run(tmp_path, cache_dir, tiny_text):
    run_dir = tmp_path / "run"
    proc = run_cli(*train_args(run_dir, cache_dir, tiny_text, "train.max_steps=3", "train.sample_tokens=0"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    beat = json.loads((run_dir / "heartbeat" / "rank-0.json").read_text())
    assert beat["phase"] == "done" and beat["step"] == 3 and beat["step_seconds"] > 0
    status = run_cli("status", str(run_dir))
    assert "rank 0: step 3 done" in status.stdout and "finished" in status.stdout


def test_laggards_in_words():
    now = time.time()
    beat = {"host": "h", "pid": 1, "since": now - 30}
    beats = [{**beat, "rank": 0, "step": 7, "phase": "optimizer"}, {**beat, "rank": 1, "step": 7, "phase": "data"},
             {**beat, "rank": 2, "step": 7, "phase": "optimizer"}]
    text = laggards(beats, 4)
    assert text.startswith("did not arrive: rank 1 (at step 7 data for 30s")
    assert "the others wait in step 7 (optimizer)" in text and "no heartbeat from rank(s) 3" in text
    same = laggards([{**b, "phase": "optimizer"} for b in beats[:2]], 2)
    assert same == "no rank is behind: all 2 wait in step 7 (optimizer) (a collective that never completes)"

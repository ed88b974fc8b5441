"""A hung rank becomes a clear error: heartbeats, the watchdog's stack dumps and the line that
names the rank that did not arrive; `bigtrain status` flags it while it hangs. Real 2-rank runs."""

from __future__ import annotations

import json
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

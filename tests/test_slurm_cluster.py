"""The test SLURM cluster itself: it starts, runs a job to COMPLETED, and stops exactly its daemons."""

import os
import subprocess
import time

import pytest

from cluster.slurm import SlurmCluster

pytestmark = [pytest.mark.slurm]


def test_single_node_cluster_runs_a_job_and_stops_cleanly(tmp_path):
    reason = SlurmCluster.skip_reason(nodes=1)
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(nodes=1).start()
    try:
        env = {**os.environ, **cluster.env}
        out = tmp_path / "job.out"
        job = subprocess.run(["sbatch", "--parsable", f"--output={out}", "--wrap", "echo ran on $SLURMD_NODENAME"],
                             capture_output=True, text=True, env=env, check=True).stdout.strip()
        deadline = time.time() + 30
        state = ""
        while time.time() < deadline:
            state = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True,
                                   env=env).stdout
            if "JobState=COMPLETED" in state:
                break
            time.sleep(0.2)
        assert "JobState=COMPLETED" in state, state
        assert out.read_text().strip() == f"ran on {cluster.node_names[0]}"
        pids = cluster.pids
        assert len(pids) == 3  # munged, slurmctld, slurmd
    finally:
        cluster.stop()
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    assert cluster.hosts_marker not in open("/etc/hosts").read()
    cluster.stop()  # idempotent

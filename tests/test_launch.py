"""Launcher without a cluster: plans, commands, the sbatch script (run by bash against fake
srun/scontrol/scancel), quoting, sweeps, and the torchrun agent's exit codes and signal forwarding."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import ROOT, TEST_CONFIG, TINY_SHAKESPEARE, run_cli

DATA = f"data.path={TINY_SHAKESPEARE}"


# ---------------------------------------------------------------------------------------------
# Plans and validation (one-line errors, before anything runs)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    (["--nproc-per-node", "3", "strategy.name=ddp"],
     "train.global_batch_size (8) must be a multiple of train.micro_batch_size x world size (4 x 3)"),
    (["--nproc-per-node", "2"], "strategy.name: 'single' runs one process, but the world size is 2"),
    (["--nnodes", "2", "strategy.name=ddp"], "--rdzv-endpoint HOST:PORT is required with --nnodes > 1"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1234", "strategy.name=ddp"],
     "--node-rank must be in 0..1 (got 2)"),
    (["--nnodes", "2", "--rdzv-endpoint", "no-port", "strategy.name=ddp"], "--rdzv-endpoint: expected HOST:PORT"),
    (["resources.launcher=deepspeed", "resources.launch_mode=srun"], "resources.launcher 'deepspeed' starts the ranks"),
])
def test_launch_rejects_bad_plans_in_one_line(args, expected):
    proc = run_cli("launch", str(TEST_CONFIG), DATA, *args, "--dry-run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout


def test_batch_error_suggests_a_micro_batch():
    proc = run_cli("launch", "configs/gpt-tiny.yaml", "--nproc-per-node", "2", "strategy.name=fsdp",
                   "train.micro_batch_size=16", "--dry-run")
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("e.g. train.micro_batch_size=8")
    assert run_cli("launch", "configs/gpt-tiny.yaml", "--nproc-per-node", "2", "strategy.name=fsdp",
                   "--dry-run").returncode == 0  # the recipe itself runs on 2 ranks


@pytest.mark.parametrize("override, expected", [
    ("resources.time=banana", "resources.time: expected a SLURM time"),
    ("resources.partition=a b", "resources.partition: must be one word"),
    ("resources.mem=4GB", "resources.mem: expected a size per node"),
    ("resources.env.BAD-NAME=1", "resources.env: 'BAD-NAME' is not a valid environment variable name"),
    ("resources.signal_grace_s=600", "resources.signal_grace_s (600) must be shorter than resources.time (00:05:00)"),
    ("resources.procs_per_node=4", "resources.procs_per_node (4) exceeds resources.gpus_per_node (2)"),
])
def test_submit_validates_resources_before_sbatch(tmp_path, override, expected):
    extra = ["resources.time=00:05:00"] if "grace" in override else []
    extra += ["resources.gpus_per_node=2", "strategy.name=ddp"] if "procs_per_node" in override else []
    proc = run_cli("submit", str(TEST_CONFIG), DATA, f"run.dir={tmp_path / 'r'}", *extra, override,
                   env={"PATH": "/nonexistent"})  # no sbatch either: validation comes first
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "r").exists()


def test_submit_checks_world_size_data_and_sbatch(tmp_path):
    proc = run_cli("submit", str(TEST_CONFIG), DATA, "resources.nodes=3", "strategy.name=ddp",
                   f"run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "(4 x 3)" in proc.stderr
    proc = run_cli("submit", str(TEST_CONFIG), "data.path=/no/such/corpus.txt", f"run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2 and "data.path: /no/such/corpus.txt does not exist" in proc.stderr
    proc = run_cli("submit", str(TEST_CONFIG), DATA, f"run.dir={tmp_path / 'r'}",
                   env={"PATH": str(Path(sys.executable).parent)})
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: sbatch: command not found (run this on a SLURM login node, or use --dry-run)"
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def test_launcher_modules_do_not_import_torch():
    code = ("import sys, launcher.cli, launcher.local, launcher.slurm, launcher.sweep, launcher.resources, "
            "launcher.torchrun, launcher.agent\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_launch_dry_run_is_torchrun_with_an_explicit_c10d_endpoint():
    proc = run_cli("launch", str(TEST_CONFIG), DATA, "--nproc-per-node", "2", "strategy.name=fsdp", "--max-restarts",
                   "3",
                   "--dry-run")
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout.strip())
    assert argv[:2] == ["OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1"]  # 2 cores / 2 ranks
    assert argv[2:5] == [sys.executable, "-m", "launcher.agent"]
    for flag in ("--nnodes=1", "--nproc-per-node=2", "--node-rank=0", "--rdzv-backend=c10d", "--max-restarts=3",
                 "--rdzv-id=bigtrain-gpt-test"):
        assert flag in argv
    endpoint = next(a for a in argv if a.startswith("--rdzv-endpoint="))
    assert endpoint.startswith("--rdzv-endpoint=127.0.0.1:") and "--standalone" not in argv
    assert argv[argv.index("-m", 5):][:3] == ["-m", "bigtrain.train", str(TEST_CONFIG)]
    assert argv[-1] == "strategy.name=fsdp"


def test_launch_multi_node_and_deepspeed_dry_runs():
    proc = run_cli("launch", str(TEST_CONFIG), DATA, "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint",
                   "head01:29400", "strategy.name=ddp", "--dry-run")
    argv = shlex.split(proc.stdout.strip())
    assert "--node-rank=1" in argv and "--rdzv-endpoint=head01:29400" in argv and "--nnodes=2" in argv
    proc = run_cli("launch", str(TEST_CONFIG), DATA, "--nproc-per-node", "2", "strategy.name=deepspeed",
                   "resources.launcher=deepspeed", "--rdzv-endpoint", "127.0.0.1:29411", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("# hostfile runs/gpt-test/hostfile-node0: localhost slots=2")
    argv = shlex.split(lines[1])
    assert argv[2:5] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    for flag in ("--no_ssh", "--node_rank=0", "--master_addr=127.0.0.1", "--master_port=29411", "--no_local_rank",
                 "--module"):
        assert flag in argv
    assert argv[argv.index("--module") + 1] == "bigtrain.train"


def test_sweep_grid_and_random():
    from bigtrain.config import ConfigError
    from launcher.sweep import expand, parse_sweep, task_overrides

    grid = expand([parse_sweep("optim.lr=[1e-4,3e-4,1e-3]"), parse_sweep("model.n_layer=[2,4]")])
    assert len(grid) == 6 and grid[0] == {"optim.lr": 1e-4, "model.n_layer": 2} and grid[1]["model.n_layer"] == 4
    rand = expand([parse_sweep("optim.lr=loguniform(1e-4,1e-2)"), parse_sweep("model.n_layer=[2,4]")],
                  "random", trials=5, seed=1)
    assert len(rand) == 5 and all(1e-4 <= r["optim.lr"] <= 1e-2 and r["model.n_layer"] in (2, 4) for r in rand)
    assert rand == expand([parse_sweep("optim.lr=loguniform(1e-4,1e-2)"), parse_sweep("model.n_layer=[2,4]")],
                          "random", trials=5, seed=1)
    assert task_overrides({"optim.lr": 3e-4, "tracking.wandb.tags": ["a b"]}, "n", 2, Path("/r/sweep-2")) == [
        "optim.lr=0.0003", 'tracking.wandb.tags=["a b"]', "run.name=n-2", "run.dir=/r/sweep-2"]
    for bad, msg in [("optim.lr=3", "non-empty list"), ("lr", "expected KEY=[v1,v2,...]"),
                     ("optim.lr=uniform(2,1)", "low < high")]:
        with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("(", r"\(")):
            parse_sweep(bad)
    with pytest.raises(ConfigError, match="needs --sweep-mode random"):
        expand([parse_sweep("optim.lr=uniform(0.1,0.2)")])


def test_sweep_dry_run_renders_one_array_job(tmp_path):
    proc = run_cli("submit", str(TEST_CONFIG), DATA, f"run.dir={tmp_path / 'sw'}", "--dry-run",
                   "--sweep", "optim.lr=[1e-4,3e-4]", "--sweep", "model.n_layer=[1,2]", "--parallel", "2")
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --array=0-3%2" in proc.stdout
    assert f"#SBATCH --output={tmp_path / 'sw'}/sweep-%a/slurm-%A_%a.out" in proc.stdout
    assert "#   3: " + str(tmp_path / "sw" / "sweep-3") + "  optim.lr=0.0003 model.n_layer=2" in proc.stdout
    assert not (tmp_path / "sw").exists()  # a dry run writes nothing
    bad = run_cli("submit", str(TEST_CONFIG), DATA, "--dry-run", "--sweep", "train.micro_batch_size=[4,3]")
    assert bad.returncode == 2 and "sweep task 1 (train.micro_batch_size=3)" in bad.stderr
    bad = run_cli("submit", str(TEST_CONFIG), DATA, "--dry-run", "--sweep", "resources.nodes=[1,2]")
    assert bad.returncode == 2 and "sweep other keys" in bad.stderr


def test_sweep_report_tables_final_metrics(tmp_path):
    from launcher.sweep import report, write_sweep_file

    tasks = []
    for i, lr in enumerate([1e-3, 3e-3]):
        run_dir = tmp_path / f"sweep-{i}"
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 5.0 - i, "tokens_per_s": 10.0}) + "\n")
        (run_dir / "eval.jsonl").write_text(json.dumps({"step": 5, "val_loss": 4.5 - i, "val_ppl": 9.0}) + "\n")
        tasks.append({"index": i, "setting": {"optim.lr": lr}, "overrides": [], "run_dir": str(run_dir)})
    write_sweep_file(tmp_path, {"job_id": "1", "mode": "grid", "keys": ["optim.lr"], "tasks": tasks})
    table = report(tmp_path).splitlines()
    assert table[0].split() == ["task", "optim.lr", "step", "loss", "val_loss", "val_ppl", "tokens_per_s"]
    assert table[2].split()[:5] == ["1", "0.003", "5", "4.0000", "3.5000"]  # best val_loss first
    assert json.loads(report(tmp_path, as_json=True))["rows"][0]["val_loss"] == 4.5


# ---------------------------------------------------------------------------------------------
# The sbatch script, executed by bash against fake SLURM commands
# ---------------------------------------------------------------------------------------------

FAKE_SLURM = {
    # srun: log its argv, then run the task command (everything after srun's own --options) once per task
    "srun": """
        printf '%s\\0' "$@" > "$FAKE_LOG/srun.argv"
        while [ "${1#--}" != "$1" ]; do shift; done
        export SLURM_NODEID=0 SLURM_PROCID=0 SLURMD_NODENAME=fake1
        exec "$@"
    """,
    "scontrol": """
        echo "scontrol $*" >> "$FAKE_LOG/calls"
        case "$1 $2" in
          "show hostnames") echo fake1; echo fake2 ;;
          "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=10.9.8.7 NodeHostName=$3" ;;
          "show job") echo "JobId=$3 JobName=gpt-test JobState=${FAKE_JOB_STATE:-RUNNING} Reason=None" ;;
        esac
    """,
    "scancel": 'echo "scancel $*" >> "$FAKE_LOG/calls"; kill -USR1 "$(cat "$FAKE_LOG/python.pid")"',
    # the "python" on compute nodes: record argv and the environment it got, then behave as asked
    "fake-python": """
        echo $$ > "$FAKE_LOG/python.pid"
        env > "$FAKE_LOG/python.env"
        printf '%s\\0' "$@" > "$FAKE_LOG/python.argv"
        case "$FAKE_MODE" in
          exit*) exit "${FAKE_MODE#exit}" ;;
          wait) trap 'echo got-usr1 >> "$FAKE_LOG/calls"; exit 75' USR1; for i in $(seq 200); do sleep 0.1; done ;;
        esac
    """,
}


def fake_cluster(tmp_path: Path) -> tuple[Path, Path]:
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + textwrap.dedent(body))
        (bin_dir / name).chmod(0o755)
    return bin_dir, log


def render_script(tmp_path: Path, *overrides: str, bin_dir: Path, run_dir: Path) -> str:
    proc = run_cli("submit", str(TEST_CONFIG), DATA, f"run.dir={run_dir}",
                   f"resources.python={bin_dir / 'fake-python'}",
                   *overrides, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def run_script(tmp_path, script: str, log: Path, bin_dir: Path, mode: str, restart: int = 0, signal_after=None):
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "FAKE_MODE": mode,
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "fake[1-2]", "SLURM_CPUS_ON_NODE": "6",
           "SLURM_RESTART_COUNT": str(restart)}
    proc = subprocess.Popen(["bash", str(path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    if signal_after is not None:
        deadline = time.time() + 20
        while not (log / "python.argv").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(signal_after)
        proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out


def nul_split(path: Path) -> list[str]:
    return path.read_bytes().decode().split("\0")[:-1]


EVIL = "x y$(touch owned)`touch owned2`;touch owned3 'q"


def test_script_quotes_every_value_and_passes_argv_exactly(tmp_path):
    bin_dir, log = fake_cluster(tmp_path)
    run_dir = tmp_path / EVIL.replace("'", "")  # a quote cannot go into an #SBATCH line (that is an error)
    script = render_script(tmp_path, "resources.nodes=2", "strategy.name=ddp", f"resources.env.NOTE={EVIL}",
                           "resources.time=00:30:00", "resources.partition=gpu", "resources.account=proj1",
                           "resources.qos=high", "resources.constraint=a100&ib", "resources.exclusive=true",
                           "resources.cpus_per_task=2", "resources.mem=16G",
                           "resources.sbatch_extra=['--reservation=res1', '#SBATCH --mail-type=NONE']",
                           bin_dir=bin_dir, run_dir=run_dir)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid bash
    for line in ("--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2", "--mem=16G", "--time=00:30:00",
                 "--partition=gpu", "--account=proj1", "--qos=high", "--constraint=a100&ib", "--exclusive",
                 "--signal=B:USR1@120", "--requeue", "--open-mode=append", "--reservation=res1", "--mail-type=NONE",
                 f'--output="{run_dir}/slurm-%j.out"'):
        assert f"#SBATCH {line}\n" in script, line
    code, out = run_script(tmp_path, script, log, bin_dir, "exit0")
    assert code == 0, out
    assert not list(tmp_path.rglob("owned*")) and not list(ROOT.glob("owned*"))  # nothing was executed
    argv = nul_split(log / "python.argv")
    assert argv[:2] == ["-m", "launcher.agent"]
    assert "--node-rank=0" in argv and "--nnodes=2" in argv and "--rdzv-id=bigtrain-4242" in argv
    assert "--shutdown-timeout=120" in argv  # the ranks get signal_grace_s to save after a stop signal
    assert "--rdzv-endpoint=10.9.8.7:24242" in argv  # head node's NodeAddr, port from the job id
    assert argv[-3:] == ["-m", "bigtrain.train", str(run_dir / "submit-config.yaml")]
    env = dict(line.split("=", 1) for line in (log / "python.env").read_text().splitlines() if "=" in line)
    assert env["NOTE"] == EVIL and env["BIGTRAIN_RUN_DIR"] == str(run_dir) and env["OMP_NUM_THREADS"] == "2"
    assert env["MASTER_ADDR"] == "10.9.8.7" and env["MASTER_PORT"] == "24242"
    srun = nul_split(log / "srun.argv")
    assert srun[:3] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1"] and "--cpus-per-task=2" in srun


def test_srun_mode_one_task_per_rank(tmp_path):
    bin_dir, log = fake_cluster(tmp_path)
    script = render_script(tmp_path, "resources.launch_mode=srun", "resources.nodes=2", "resources.procs_per_node=2",
                           "strategy.name=ddp", "train.global_batch_size=16", "resources.rdzv_port=29999",
                           bin_dir=bin_dir, run_dir=tmp_path / "run")
    code, out = run_script(tmp_path, script, log, bin_dir, "exit0")
    assert code == 0, out
    assert nul_split(log / "python.argv") == ["-m", "bigtrain.train", str(tmp_path / "run" / "submit-config.yaml")]
    assert nul_split(log / "srun.argv")[:3] == ["--nodes=2", "--ntasks=4", "--ntasks-per-node=2"]
    assert "#SBATCH --ntasks-per-node=2\n" in script
    env = (log / "python.env").read_text()
    assert "MASTER_ADDR=10.9.8.7\n" in env and "MASTER_PORT=29999\n" in env
    assert "OMP_NUM_THREADS=3\n" in env  # the node's 6 allocated CPUs / 2 ranks


def test_deepspeed_launcher_gets_a_hostfile_and_node_rank(tmp_path):
    bin_dir, log = fake_cluster(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = render_script(tmp_path, "resources.launcher=deepspeed", "resources.nodes=2", "strategy.name=deepspeed",
                           bin_dir=bin_dir, run_dir=run_dir)
    code, out = run_script(tmp_path, script, log, bin_dir, "exit0")
    assert code == 0, out
    argv = nul_split(log / "python.argv")
    assert argv[:3] == ["-m", "deepspeed.launcher.runner", "--node_rank=0"]
    assert f"--hostfile={run_dir}/hostfile-4242" in argv and "--no_ssh" in argv and "--master_addr=10.9.8.7" in argv
    assert (run_dir / "hostfile-4242").read_text() == "fake1 slots=1\nfake2 slots=1\n"


def test_requeue_code_requeues_and_other_codes_do_not(tmp_path):
    bin_dir, log = fake_cluster(tmp_path)
    script = render_script(tmp_path, "resources.max_requeues=2", bin_dir=bin_dir, run_dir=tmp_path / "run")
    code, out = run_script(tmp_path, script, log, bin_dir, "exit75")
    assert code == 0 and "scontrol requeue 4242" in (log / "calls").read_text(), out
    (log / "calls").unlink()
    code, out = run_script(tmp_path, script, log, bin_dir, "exit75", restart=2)
    assert code == 75 and "requeue" not in (log / "calls").read_text() and "not requeueing" in out
    code, out = run_script(tmp_path, script, log, bin_dir, "exit1")
    assert code == 1 and "requeue" not in (log / "calls").read_text()


def test_a_cancelled_job_saves_but_is_not_requeued(tmp_path, monkeypatch):
    """scancel's TERM looks like preemption (the ranks save and exit 75): no requeue when
    `bigtrain cancel` left its mark, or when SLURM reports the job CANCELLED."""
    bin_dir, log = fake_cluster(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = render_script(tmp_path, bin_dir=bin_dir, run_dir=run_dir)
    (run_dir / ".cancelled-4242").touch()
    code, out = run_script(tmp_path, script, log, bin_dir, "exit75")
    assert code == 75 and "the job was cancelled, not requeueing" in out, out
    assert "requeue" not in (log / "calls").read_text()
    (run_dir / ".cancelled-4242").unlink()
    monkeypatch.setenv("FAKE_JOB_STATE", "CANCELLED")
    code, out = run_script(tmp_path, script, log, bin_dir, "exit75")
    assert code == 75 and "not requeueing" in out and "scontrol requeue" not in (log / "calls").read_text(), out


def test_usr1_to_the_batch_shell_is_forwarded_to_the_step(tmp_path):
    bin_dir, log = fake_cluster(tmp_path)
    script = render_script(tmp_path, bin_dir=bin_dir, run_dir=tmp_path / "run")
    code, out = run_script(tmp_path, script, log, bin_dir, "wait", signal_after=0.5)
    calls = (log / "calls").read_text()
    assert "got SIGUSR1" in out and "scancel --signal=USR1 4242" in calls, out + calls
    assert "got-usr1" in calls and "scontrol requeue 4242" in calls and code == 0, out + calls


def test_custom_template_and_bad_templates(tmp_path):
    good = tmp_path / "mine.sbatch"
    good.write_text("#!/bin/bash\n{{directives}}\nmodule load cuda\n{{exports}}\n{{step_command}}\n")
    proc = run_cli("submit", str(TEST_CONFIG), DATA, f"run.dir={tmp_path / 'r'}", "--template", str(good), "--dry-run")
    assert proc.returncode == 0 and "module load cuda" in proc.stdout and "srun --nodes=1" in proc.stdout
    bad = tmp_path / "bad.sbatch"
    bad.write_text("#!/bin/bash\n{{directives}}\n{{nope}}\n")
    proc = run_cli("submit", str(TEST_CONFIG), DATA, f"resources.template={bad}", "--dry-run")
    assert proc.returncode == 2 and "unknown placeholder {{nope}}" in proc.stderr
    bad.write_text("#!/bin/bash\n{{directives}}\n")
    proc = run_cli("submit", str(TEST_CONFIG), DATA, f"resources.template={bad}", "--dry-run")
    assert proc.returncode == 2 and "must contain {{step_command}}" in proc.stderr


def test_run_name_with_shell_syntax_is_rejected_and_runs_nothing(tmp_path):
    proc = run_cli("submit", str(TEST_CONFIG), DATA, "run.name=x$(touch owned)", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: run.name: string should match pattern")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# The per-node agent: torchrun that keeps the ranks' exit code and forwards SIGUSR1
# ---------------------------------------------------------------------------------------------

WORKER = """
import os, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
os.write(1, ("worker %s ready\\n" % os.environ["RANK"]).encode())  # one write: lines of two ranks never mix
if sys.argv[1] != "wait":
    sys.exit(int(sys.argv[1]) if os.environ["RANK"] == "0" else 0)
end = time.time() + 60
while not got and time.time() < end:
    time.sleep(0.05)
sys.exit(75 if got else 0)
"""


def agent(tmp_path, *args):
    from launcher.torchrun import free_port

    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    cmd = [sys.executable, "-m", "launcher.agent", "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=t", "--max-restarts=0", str(worker), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_combine_exit_codes():
    from launcher.agent import combine_exit_codes as combine

    assert combine([0, 0]) == 0
    assert combine([75, 75]) == 75
    assert combine([75, -signal.SIGTERM]) == 75  # the agent stopped the slower rank
    assert combine([75, 1]) == 1
    assert combine([2, 75]) == 2
    assert combine([None, None], signal.SIGUSR1) == 128 + signal.SIGUSR1
    assert combine([-signal.SIGKILL]) == 128 + signal.SIGKILL


@pytest.mark.dist
def test_agent_exits_with_the_ranks_code(tmp_path):
    for code in (75, 2, 0):
        proc = agent(tmp_path, str(code))
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == code, out
    assert "bigtrain agent: rank 1/2 (local 1) on host" in out


@pytest.mark.dist
def test_agent_forwards_usr1_to_every_rank_and_returns_requeue(tmp_path):
    proc = agent(tmp_path, "wait")
    lines = []
    while "".join(lines).count("ready") < 2:
        line = proc.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, "".join(lines) + out
    assert "workers exited [75, 75]; exit code 75" in out


# ---------------------------------------------------------------------------------------------
# Recipes as a new user runs them
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["train"], ["data", "prepare"]])
def test_a_mistyped_data_path_is_an_error_not_a_download(tmp_path, command):
    """gpt-tiny downloads Shakespeare into its own data.path when missing; a path given on the
    command line that does not exist is a one-line error, and nothing is created."""
    proc = run_cli(*command, str(ROOT / "configs" / "gpt-tiny.yaml"), "data.path=my_corpus_typo.txt",
                   f"run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: data.path: no such file or directory: 'my_corpus_typo.txt'"
    assert list(tmp_path.iterdir()) == []


def test_the_recipe_keeps_its_download_when_the_path_is_its_own():
    from bigtrain.config import load_config

    assert load_config(ROOT / "configs" / "gpt-tiny.yaml").data.download == "shakespeare"
    assert load_config(ROOT / "configs" / "gpt-tiny.yaml", ["data.path=elsewhere"]).data.download is None
    both = load_config(ROOT / "configs" / "gpt-tiny.yaml", ["data.path=elsewhere", "data.download=shakespeare"])
    assert both.data.download == "shakespeare"  # asked for explicitly


@pytest.mark.parametrize("recipe, gpus", [("gpt2-small", 8), ("llama-1b", 8)])
def test_gpu_recipes_ask_slurm_for_their_gpus(tmp_path, recipe, gpus):
    proc = run_cli("submit", str(ROOT / "configs" / f"{recipe}.yaml"), DATA, f"run.dir={tmp_path / 'r'}", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert f"#SBATCH --gpus-per-node={gpus}\n" in proc.stdout
    fewer = run_cli("submit", str(ROOT / "configs" / f"{recipe}.yaml"), DATA, f"run.dir={tmp_path / 'r'}",
                    "resources.procs_per_node=4", "strategy.name=fsdp", "--dry-run")
    assert "#SBATCH --gpus-per-node=4\n" in fewer.stdout  # one GPU per rank
    cpu = run_cli("submit", str(ROOT / "configs" / "gpt-tiny.yaml"), DATA, f"run.dir={tmp_path / 'c'}", "--dry-run")
    assert cpu.returncode == 0 and "--gpus-per-node" not in cpu.stdout

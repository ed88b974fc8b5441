"""The launcher runs on login nodes: it must not import torch."""

import subprocess
import sys

from conftest import ROOT


def test_launcher_and_config_and_data_prep_do_not_import_torch():
    code = (
        "import sys, launcher.cli, launcher.report, bigtrain.config, bigtrain.data.prepare\n"
        "launcher.cli.build_parser()\n"
        "bigtrain.config.load_config('configs/gpt-tiny.yaml')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_dry_run_prints_the_rank_command():
    from launcher.cli import training_command

    single = training_command("c.yaml", ["optim.lr=1"], 1)
    assert single[1:] == ["-m", "bigtrain.train", "c.yaml", "optim.lr=1"]
    multi = training_command("c.yaml", [], 2)
    assert "launcher.agent" in multi and "--nproc-per-node=2" in multi
    assert "--shutdown-timeout=30" in multi
    assert "--shutdown-timeout=200" in training_command("c.yaml", [], 2, stop_grace_s=200)

"""benchmarks/gpu_check.py, the GPU matrix, in the mode that runs here: tiny sizes on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import OFFLINE_ENV, ROOT

pytestmark = pytest.mark.slow


def gpu_check(*args: str, tmp_path) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env={**os.environ, **OFFLINE_ENV})
    return proc, json.loads(out.read_text()) if out.is_file() else json.loads(proc.stdout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_without_cuda_it_says_so_and_exits_0(tmp_path):
    proc, report = gpu_check(tmp_path=tmp_path)
    assert proc.returncode == 0
    assert report["cuda"] is False and report["rows"] == [] and "--allow-cpu" in report["note"]


def test_allow_cpu_runs_the_matrix_and_every_row_is_ok(tmp_path, tiny_text):
    proc, report = gpu_check("--allow-cpu", "--text", str(tiny_text), "--only", "main,gpt2-fsdp,resnet,perf-single",
                             tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["case"]: r for r in report["rows"]}
    assert sorted(rows) == ["gpt2-fsdp", "main-bf16", "perf-single-compiled", "perf-single-eager", "resnet"]
    assert all(r["ok"] for r in rows.values()), report
    # trained, evaluated after a resume (step 9 = 6 + 3), and measured
    assert rows["gpt2-fsdp"]["tokens_per_s"] > 0 and rows["gpt2-fsdp"]["val_loss"] > 0
    assert rows["perf-single-eager"]["mfu"] > 0 and rows["resnet"]["peak_mem_gb"] > 0

"""The one place that chooses device and backend (bigtrain.dist), without GPUs: the choice for
CUDA ranks is pinned here, and a run configured for GPUs that finds none stops with one line."""

from __future__ import annotations

import pytest
import torch

from bigtrain import dist
from bigtrain.config import ConfigError
from conftest import ROOT, run_cli


def test_backend_for_cuda_carries_cpu_tensors_too():
    # NCCL alone has no CPU backend: eval sums, object broadcasts and DCP's async save need gloo.
    assert dist.backend_for("cuda") == "cpu:gloo,cuda:nccl"
    assert dist.backend_for("cpu") == "gloo"


def test_device_choice_follows_resources_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert dist.pick_device(5, "auto") == torch.device("cuda", 1)  # local rank modulo the GPUs
    assert dist.pick_device(2, "gpu") == torch.device("cuda", 2)
    assert dist.pick_device(2, "cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dist.pick_device(0, "auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="resources.accelerator: gpu, but this process sees no CUDA device"):
        dist.pick_device(0, "gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without GPUs")
def test_a_gpu_run_without_gpus_stops_with_one_line(tmp_path, cache_dir, tiny_text):
    proc = run_cli("train", str(ROOT / "tests" / "configs" / "gpt-test.yaml"), f"run.dir={tmp_path / 'run'}",
                   f"data.cache_dir={cache_dir}", f"data.path={tiny_text}", "resources.accelerator=gpu")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: resources.accelerator: gpu, but this process")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

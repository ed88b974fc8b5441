"""bigtrain's speed is not bought with different math: with the same seed and settings (fp32), its
per-step losses are the hand-written loop's of benchmarks/peers.py, within 1e-4 over 20 steps."""

from __future__ import annotations

import importlib.util

import pytest

from bigtrain.config import load_config
from bigtrain.data.prepare import prepare
from conftest import ROOT, TEST_CONFIG

spec = importlib.util.spec_from_file_location("peers", ROOT / "benchmarks" / "peers.py")
peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peers)


@pytest.mark.parametrize("accum", [1, 2])
def test_bigtrain_and_the_plain_loop_compute_the_same_losses(tmp_path, cache_dir, tiny_text, accum):
    cfg = load_config(TEST_CONFIG, [f"data.path={tiny_text}", f"data.cache_dir={cache_dir}",
                                    "train.global_batch_size=8", f"train.micro_batch_size={8 // accum}"])
    data = prepare(cfg.data, log=lambda _m: None)
    _, ours = peers.run_bigtrain(cfg, 20, tmp_path)
    _, plain = peers.run_plain(cfg, data, 20)
    assert len(ours) == len(plain) == 20
    assert ours == pytest.approx(plain, abs=1e-4)
    assert ours[-1] < ours[0] - 0.3  # and both learn

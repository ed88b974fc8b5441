"""Run by tests/test_strategies.py (under torchrun for several ranks): one forward/backward of a
micro-batch through the configured engine, reporting how often the layers inside the
transformer blocks ran forward and how many activation bytes autograd saved for backward. With
activation checkpointing every layer of a block runs twice (forward, then recomputed in
backward) and far fewer activations are saved."""

import json
import os
import sys

import torch

from bigtrain import dist
from bigtrain.config import load_config
from bigtrain.data.stream import StatefulLoader
from bigtrain.models import repeated_blocks
from bigtrain.strategies import build_strategy
from bigtrain.tasks import build_task


def probe(argv: list[str]) -> dict:
    cfg = load_config(argv[0], argv[1:])
    info = dist.init(always=cfg.strategy.name != "single")
    task = build_task(cfg, info, lambda _msg: None)
    task.prepare()
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    blocks = repeated_blocks(model)
    calls = [0]
    layers = [layer for block in blocks for layer in block.children()]
    for layer in layers:  # transformers checkpoints a block's forward: hooks on the block run once
        layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    strategy = build_strategy(cfg, info, task.objective)
    strategy.setup(model)
    batch = StatefulLoader(task.train_stream()).next()
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        strategy.forward_backward(batch, scale=1.0, last_micro=True)
    strategy.close()
    return {"rank": info.rank, "layers": len(layers), "layer_forwards": calls[0], "saved_bytes": saved[0]}


if __name__ == "__main__":
    line = "PROBE " + json.dumps(probe(sys.argv[1:])) + "\n"
    sys.stdout.flush()
    os.write(1, line.encode())  # one write: the ranks' lines never interleave
    dist.shutdown()

"""GPT-2's GELU as one kernel (``gelu_pytorch_tanh``, as bigtrain builds GPT-2) against transformers'
default ``gelu_new`` (the same tanh formula as a chain of element-wise ops). Prints one JSON object.

    python benchmarks/gelu.py [--rounds 3] [--steps 8] [--config configs/gpt-tiny.yaml] [key=value ...]

Per activation, alternately in this process, several rounds: the activation's forward + backward
on one micro-batch's MLP input, an eager fp32 training step of the whole model (fused AdamW,
median step time), and the bytes autograd keeps for backward in one forward (up to the logits).
Both models start from the same weights; ``max_abs_diff`` is the largest difference between the
two activations' outputs on that input.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.activations import ACT2FN  # noqa: E402

from bigtrain.config import load_config  # noqa: E402
from bigtrain.models.gpt import hf_config  # noqa: E402

ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


def model_with(cfg, activation: str, vocab: int):
    config = hf_config(cfg.model, vocab, cfg.train.seq_len)
    config.activation_function = activation
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(config).train()


def activation_ms(activation: str, x: torch.Tensor, grad: torch.Tensor, repeats: int = 10) -> float:
    fn, times = ACT2FN[activation], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x).backward(grad)
        times.append(time.perf_counter() - t0)
        x.grad = None
    return statistics.median(times) * 1e3


def step_ms(model, ids: torch.Tensor, steps: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        logits = model(input_ids=ids).logits
        F.cross_entropy(logits.float().view(-1, logits.size(-1))[:-1], ids.view(-1)[1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def saved_bytes(model, ids: torch.Tensor) -> int:
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return sum(saved.values())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--config", default=str(ROOT / "configs" / "gpt-tiny.yaml"))
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, ["train.global_batch_size=8", "train.micro_batch_size=8", *args.overrides])
    t = cfg.train
    ids = torch.randint(0, args.vocab, (t.micro_batch_size, t.seq_len), generator=torch.Generator().manual_seed(0))
    d_ff = cfg.model.d_ff or 4 * cfg.model.d_model
    x = torch.randn(t.micro_batch_size, t.seq_len, d_ff, requires_grad=True)
    grad = torch.randn_like(x)
    models = {a: model_with(cfg, a, args.vocab) for a in ACTIVATIONS}
    act_ms: dict[str, list[float]] = {a: [] for a in ACTIVATIONS}
    steps: dict[str, list[float]] = {a: [] for a in ACTIVATIONS}
    for _ in range(args.rounds):
        for a in ACTIVATIONS:
            act_ms[a].append(round(activation_ms(a, x, grad), 2))
            steps[a].append(round(step_ms(models[a], ids, args.steps), 1))
    median = {a: statistics.median(v) for a, v in steps.items()}
    act_median = {a: statistics.median(v) for a, v in act_ms.items()}
    saved = {a: saved_bytes(models[a], ids) for a in ACTIVATIONS}  # the same after training: sizes, not values
    with torch.no_grad():
        diff = (ACT2FN["gelu_new"](x) - ACT2FN["gelu_pytorch_tanh"](x)).abs().max().item()
    report = {
        "benchmark": "gelu",
        "device": f"cpu, {torch.get_num_threads()} threads",
        "model": f"gpt2 {cfg.model.n_layer}L d{cfg.model.d_model} seq {t.seq_len} vocab {args.vocab}, "
                 f"micro-batch {t.micro_batch_size}, fp32 eager",
        "activation_fwd_bwd_ms": act_ms, "step_ms": steps,
        "activation_speedup": round(act_median["gelu_new"] / act_median["gelu_pytorch_tanh"], 2),
        "step_speedup": round(median["gelu_new"] / median["gelu_pytorch_tanh"], 3),
        "saved_activation_bytes": saved,
        "saved_ratio": round(saved["gelu_pytorch_tanh"] / saved["gelu_new"], 3),
        "max_abs_diff": diff,
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()

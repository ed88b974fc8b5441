"""The planner's predictions for GPT-style models on H100s (the README's table), reproducibly.

    python benchmarks/plan_table.py            # JSON, one object per cell
    python benchmarks/plan_table.py --markdown # the README tables

125M and 1.3B are GPT-3's Small and XL shapes (GPT-2 blocks, vocabulary 50304, sequence 2048,
micro-batch 4); 7B and 70B are Llama 2's (GQA for 70B, vocabulary 32000, sequence 4096,
micro-batch 1). bf16, one micro-batch per step, on 8 H100s (one node) and 64 (8 nodes), under
ZeRO-2, ZeRO-3 and FSDP, without and with activation checkpointing (eager). Beside them: the model
states per GPU next to DeepSpeed's own estimators (``estimate_zero2/3_model_states_mem_needs``,
when deepspeed imports) and the ZeRO paper's 16 bytes per parameter.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launcher.plan import DEVICES, Setup, Shape, plan_fit  # noqa: E402

MODELS = {
    "125M": (Shape("gpt2", 12, 768, 12, 12, 3072, 50304, 2048, True), 2048, 4),
    "1.3B": (Shape("gpt2", 24, 2048, 16, 16, 8192, 50304, 2048, True), 2048, 4),
    "7B": (Shape("llama", 32, 4096, 32, 32, 11008, 32000, 4096, False), 4096, 1),
    "70B": (Shape("llama", 80, 8192, 64, 8, 28672, 32000, 4096, False), 4096, 1),
}
GPUS = {8: 1, 64: 8}  # GPUs: nodes
ENGINES = {"ZeRO-2": {"strategy": "deepspeed", "stage": 2}, "ZeRO-3": {"strategy": "deepspeed", "stage": 3},
           "FSDP": {"strategy": "fsdp"}}


def cells() -> list[dict]:
    device = DEVICES["h100"]
    out = []
    for model, (shape, seq, micro) in MODELS.items():
        for gpus, nodes in GPUS.items():
            for engine, settings in ENGINES.items():
                for ac in (False, True):
                    setup = Setup(precision="bf16", world=gpus, nodes=nodes, micro_batch=micro,
                                  global_batch=micro * gpus, seq_len=seq, activation_checkpointing=ac, **settings)
                    fit = plan_fit(shape, setup, device)
                    est = fit.estimate
                    out.append({"model": model, "params": shape.params, "gpus": gpus, "engine": engine,
                                "activation_checkpointing": ac, "peak_gb": est.peak / 1e9,
                                "states_gb": est.states / 1e9, "activations_gb": est.activations.total / 1e9,
                                "budget_gb": fit.budget / 1e9, "fits": fit.fits, "step_s": fit.timing.seconds,
                                "tokens_per_s_per_gpu": fit.timing.tokens_per_s(setup) / gpus})
    return out


def deepspeed_estimates(shape: Shape, gpus: int, nodes: int) -> dict[str, float] | None:
    """DeepSpeed's published estimators (model states per GPU, no offload), if deepspeed imports."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed logs its accelerator choice to stdout
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except Exception:  # noqa: BLE001 - any import failure: leave the column out
        return None
    per_node = gpus // nodes
    _, zero2 = estimate_zero2_model_states_mem_needs(shape.params, per_node, nodes, cpu_offload=False)
    largest = max(shape.block_params, shape.embedding_params)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(shape.params, largest, per_node, nodes, cpu_offload=False)
    return {"ZeRO-2": zero2 / 1e9, "ZeRO-3": zero3 / 1e9}


def states_rows() -> list[dict]:
    rows = []
    for model, (shape, seq, micro) in MODELS.items():
        for gpus, nodes in GPUS.items():
            row = {"model": model, "gpus": gpus, "zero_paper_replicated_gb": 16 * shape.params / 1e9}
            for engine, settings in ENGINES.items():
                setup = Setup(precision="bf16", world=gpus, nodes=nodes, micro_batch=micro, global_batch=micro * gpus,
                              seq_len=seq, **settings)
                fit = plan_fit(shape, setup, DEVICES["h100"])
                row[f"{engine}_states_gb"] = fit.estimate.states / 1e9
                row[f"{engine}_step_gb"] = fit.estimate.step_peak / 1e9
            row["deepspeed_estimator_gb"] = deepspeed_estimates(shape, gpus, nodes)
            rows.append(row)
    return rows


def torchtitan_comparison() -> dict:
    """Llama 3.1 8B, FSDP on 8 H100s, local batch 2 x 8192 tokens: torchtitan's docs/performance.md
    reports 82.4 GiB (77.0 GiB compiled) with selective activation checkpointing, which keeps more
    than full checkpointing and less than none."""
    shape = Shape("llama", 32, 4096, 32, 8, 14336, 128256, 8192, False)
    setup = Setup(precision="bf16", strategy="fsdp", world=8, nodes=1, micro_batch=2, global_batch=16, seq_len=8192)
    fits = {ac: plan_fit(shape, replace(setup, activation_checkpointing=ac), DEVICES["h100"]) for ac in (True, False)}
    return {"full_ac_gib": fits[True].estimate.peak / 2**30, "no_ac_gib": fits[False].estimate.peak / 2**30,
            "torchtitan_selective_ac_gib": 82.4, "torchtitan_selective_ac_compiled_gib": 77.0}


def markdown(rows: list[dict]) -> str:
    budget = rows[0]["budget_gb"]
    head = ("| model | GPUs | " + " | ".join(f"{e} | {e} + AC" for e in ENGINES) + " | step (FSDP + AC) |\n"
            "|---|---|" + "---|" * (2 * len(ENGINES)) + "---|")
    lines = [head]
    for model in MODELS:
        for gpus in GPUS:
            cell = {(r["engine"], r["activation_checkpointing"]): r for r in rows
                    if r["model"] == model and r["gpus"] == gpus}
            values = []
            for engine in ENGINES:
                for ac in (False, True):
                    r = cell[engine, ac]
                    values.append(f"{r['peak_gb']:.1f}" if r["fits"] else f"{r['peak_gb']:.0f} ✗")
            fsdp = cell["FSDP", True]
            lines.append(f"| {model} | {gpus} | " + " | ".join(values)
                         + f" | {fsdp['step_s']:.2f} s, {fsdp['tokens_per_s_per_gpu']:,.0f} tok/s/GPU |")
    lines.append(f"\nPeak GB per GPU (✗: over the {budget:.1f} GB usable of an H100's 85.0 GB).\n")
    lines.append("| model | GPUs | 16 B/param, replicated | ZeRO-2 states (step) | ZeRO-3 states (step) | "
                 "FSDP states (step) | DeepSpeed estimator ZeRO-2 / ZeRO-3 |\n|---|---|---|---|---|---|---|")
    for r in states_rows():
        ds = r["deepspeed_estimator_gb"]
        ds_text = f"{ds['ZeRO-2']:.1f} / {ds['ZeRO-3']:.1f}" if ds else "(deepspeed not importable)"
        lines.append(f"| {r['model']} | {r['gpus']} | {r['zero_paper_replicated_gb']:.1f} | "
                     + " | ".join(f"{r[f'{e}_states_gb']:.1f} ({r[f'{e}_step_gb']:.1f})" for e in ENGINES)
                     + f" | {ds_text} |")
    tt = torchtitan_comparison()
    lines.append(f"\nLlama 3.1 8B, FSDP, 8 H100s, micro-batch 2 x 8192: predicted {tt['full_ac_gib']:.1f} GiB with "
                 f"full activation checkpointing, {tt['no_ac_gib']:.1f} GiB without; torchtitan reports "
                 f"{tt['torchtitan_selective_ac_gib']} GiB ({tt['torchtitan_selective_ac_compiled_gib']} compiled) "
                 f"with selective checkpointing.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the README tables instead of JSON")
    args = parser.parse_args()
    rows = cells()
    if args.markdown:
        print(markdown(rows))
    else:
        print(json.dumps({"cells": rows, "model_states": states_rows(), "torchtitan": torchtitan_comparison()},
                         indent=1))


if __name__ == "__main__":
    main()

"""``bigtrain plan`` and the one-line fit check that ``train``, ``launch`` and ``submit`` run
before starting anything. No torch.

The launchers check only when the device is named: ``--gpu-type`` or ``resources.gpu_type``
(``cpu``: the host's memory, shared by the node's ranks). Without one nothing is printed: the
launcher cannot know what a compute node holds, and guessing would refuse runs that fit.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from bigtrain.config import ConfigError, RunConfig
from launcher.plan.fit import (
    DEVICE_NAMES,
    USABLE,
    Device,
    Fit,
    change_text,
    cheapest_fit,
    device_named,
    gb,
    measured_mfu,
    plan_fit,
    seconds,
)
from launcher.plan.memory import Setup
from launcher.plan.shapes import shape_of
from launcher.resources import load_run_config, make_plan


def add_fit_options(parser: argparse.ArgumentParser) -> None:
    """``--gpu-type`` and ``--force`` of the launching commands."""
    parser.add_argument("--gpu-type", default=None, metavar="TYPE",
                        help=f"check that the plan fits this device before starting ({', '.join(DEVICE_NAMES)}; "
                             f"default: resources.gpu_type, else no check)")
    parser.add_argument("--force", action="store_true", help="start even when the plan does not fit")


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="per-rank memory and step time of a config; whether it fits, and what to change")
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. strategy.name=fsdp")
    p.add_argument("--gpus", type=int, default=None,
                   help="ranks in all (default: resources.nodes x resources.procs_per_node)")
    p.add_argument("--nodes", type=int, default=None, help="nodes the ranks span (default: resources.nodes)")
    p.add_argument("--gpu-type", default=None, metavar="TYPE",
                   help=f"the device: {', '.join(DEVICE_NAMES)} (default: resources.gpu_type)")
    p.add_argument("--run", default=None, metavar="RUN_DIR", help="use the MFU measured in RUN_DIR/metrics.jsonl")
    p.add_argument("--mfu", type=float, default=None, help="assume this MFU (default: 0.40, or --run's)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plan)


def _ranks(cfg: RunConfig, gpus: int | None, nodes: int | None) -> tuple[int, int]:
    """(world size, nodes) for ``bigtrain plan``, validated as a launch would be."""
    res = cfg.resources
    if gpus is not None and gpus < 1:
        raise ConfigError(f"--gpus must be >= 1 (got {gpus})")
    if nodes is not None and nodes < 1:
        raise ConfigError(f"--nodes must be >= 1 (got {nodes})")
    nodes = nodes or res.nodes
    gpus = gpus or nodes * res.procs_per_node
    if gpus % nodes:
        raise ConfigError(f"--gpus {gpus} does not split evenly over {nodes} node(s)")
    plan = make_plan(cfg, nodes, gpus // nodes)
    return plan.world_size, plan.nodes


def _device(cfg: RunConfig, gpu_type: str | None) -> Device | None:
    name = gpu_type or cfg.resources.gpu_type
    if name is None:
        return None
    return device_named(name, cfg, "--gpu-type" if gpu_type else "resources.gpu_type")


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.overrides)
    world, nodes = _ranks(cfg, args.gpus, args.nodes)
    device = _device(cfg, args.gpu_type)
    try:
        shape = shape_of(cfg)
    except ConfigError as err:
        raise ConfigError(f"plan: {err}") from None
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1] (got {args.mfu})")
    mfu = measured_mfu(args.run) if args.run else args.mfu
    setup = Setup.from_config(cfg, world, nodes)
    fit = plan_fit(shape, setup, device or Device("unknown", float("inf"), None), mfu)
    better = cheapest_fit(shape, setup, fit.device, mfu) if device is not None and not fit.fits else None
    if args.json:
        print(json.dumps(plan_json(fit, better, known=device is not None), indent=2))
    else:
        print(plan_text(args.config, fit, better, known=device is not None, measured_from=args.run))
    return 0


def plan_json(fit: Fit, better: Fit | None = None, known: bool = True) -> dict:
    est = fit.estimate
    out = {
        "model": {**asdict(fit.shape), "params": fit.shape.params,
                  "flops_per_token": fit.shape.flops_per_token(fit.setup.seq_len)},
        "setup": {**asdict(fit.setup), "regime": fit.setup.regime, "label": fit.setup.label()},
        "per_rank_bytes": {name: value for name, value, _ in est.terms()},
        "peak_bytes": est.peak, "backward_peak_bytes": est.backward_peak, "step_peak_bytes": est.step_peak,
        "peak_bytes_with_ac": est.peak_with(True), "peak_bytes_without_ac": est.peak_with(False),
        "host_bytes": est.host,
        "device": fit.device.name if known else None,
        "budget_bytes": fit.budget if known else None,
        "fits": fit.fits if known else None,
        "step_s": fit.timing.seconds if fit.timing else None,
        "tokens_per_s": fit.timing.tokens_per_s(fit.setup) if fit.timing else None,
        "mfu": fit.timing.mfu if fit.timing else None,
        "mfu_measured": fit.timing.measured if fit.timing else None,
    }
    if better is not None:
        out["suggestion"] = {"change": change_text(fit.setup, better.setup), "peak_bytes": better.estimate.peak,
                             "step_s": better.timing.seconds if better.timing else None}
    return out


def plan_text(config: str, fit: Fit, better: Fit | None, known: bool, measured_from: str | None = None) -> str:
    s, shape, est = fit.setup, fit.shape, fit.estimate
    regime = {"fp32": "fp32", "autocast": f"{s.precision} (autocast)", "low": f"{s.precision} (model cast)"}[s.regime]
    lines = [
        f"plan for {config}",
        f"model     {shape.describe()}",
        f"run       {s.label()} on {s.world} rank(s) ({s.nodes} node(s)), {regime}, micro-batch {s.micro_batch} x "
        f"{s.seq_len} tokens, {s.accumulation} micro-batch(es) per step"
        + (", compiled" if s.compile else "") + (", activation checkpointing" if s.activation_checkpointing else ""),
        "per rank                         GB",
    ]
    for name, value, note in est.terms():
        if value or name.startswith(("parameters", "gradients", "optimizer state", "activations")):
            lines.append(f"  {name:<28}{value / 1e9:8.3f}  {note}".rstrip())
    phase = "backward" if est.backward_peak >= est.step_peak else "optimizer step"
    lines.append(f"  {'peak':<28}{est.peak / 1e9:8.3f}  at the {phase}; with activation checkpointing "
                 f"{gb(est.peak_with(True))}, without {gb(est.peak_with(False))}")
    if est.host:
        budget = "" if not known or fit.device.is_cpu else f"  of {gb(fit.host_budget)} GB per rank on the node"
        lines.append(f"  {'host memory (offloaded)':<28}{est.host / 1e9:8.3f}{budget}")
    if known:
        verdict = "fits" if fit.fits else "does NOT fit"
        lines.append(f"device    {fit.device.name}: {gb(fit.need)} GB/rank of {gb(fit.budget)} GB usable "
                     f"({USABLE:.0%} of {gb(fit.device.memory)} GB"
                     + (f", shared by {s.world // s.nodes} ranks" if fit.device.is_cpu and s.world > s.nodes else "")
                     + f"): {verdict}")
    else:
        lines.append("device    unknown: give --gpu-type (h100, h200, a100-80g, a100-40g, cpu) or resources.gpu_type")
    t = fit.timing
    if t is not None:
        source = f"measured in {measured_from}" if t.measured else "assumed"
        detail = "" if t.measured else (f"; compute {t.compute:.3g} s, communication {t.comm:.3g} s"
                                        + (f", offload {t.offload:.3g} s" if t.offload else ""))
        lines.append(f"time      {seconds(t)} at MFU {t.mfu:.0%} ({source}{detail}), "
                     f"{t.tokens_per_s(s):,.0f} tokens/s ({t.tokens_per_s(s) / s.world:,.0f} per rank)")
    if known and not fit.fits:
        lines.append("change    " + (_suggestion(fit, better, "submit") or "nothing found up to 64x the ranks"))
    return "\n".join(lines)


def _suggestion(fit: Fit, better: Fit | None, launcher: str) -> str | None:
    if better is None:
        return None
    return (f"{change_text(fit.setup, better.setup, launcher)} ({gb(better.need)} GB/rank, "
            f"{seconds(better.timing)})")


def check_fits(cfg: RunConfig, *, world: int, nodes: int, gpu_type: str | None = None, force: bool = False,
               launcher: str = "submit", variants: list[tuple[str, RunConfig]] = (), out=None) -> None:
    """Print the one-line fit check to stderr, or raise ConfigError when the plan cannot fit
    (unless ``force``). Runs only when the device is named. ``variants``: (label, config) of the
    tasks of a sweep, each checked; the line shows the largest."""
    out = out or sys.stderr
    device = _device(cfg, gpu_type)
    if device is None:
        return
    fits = []
    for label, variant in [("", cfg)] if not variants else list(variants):
        try:
            shape = shape_of(variant)
        except ConfigError as err:
            print(f"plan: not checked ({err})", file=out)
            return
        fits.append((label, plan_fit(shape, Setup.from_config(variant, world, nodes), device)))
    failed = [(label, f) for label, f in fits if not f.fits]
    label, fit = failed[0] if failed else max(fits, key=lambda item: item[1].need)
    where = f"{fit.device.name} x {world}" if world > 1 else fit.device.name
    head = f"plan: {label + ': ' if label else ''}{gb(fit.need)} GB/rank"
    if fit.fits:
        print(f"{head} of {gb(fit.budget)} GB usable ({where}), {seconds(fit.timing)}, fits", file=out, flush=True)
        return
    better = cheapest_fit(fit.shape, fit.setup, fit.device)
    change = _suggestion(fit, better, launcher)
    if fit.need > fit.budget:
        short = f"{head} does not fit in {gb(fit.budget)} GB usable ({where})"
    else:
        short = (f"{head} fits ({where}) but {gb(fit.estimate.host)} GB/rank offloaded does not fit in "
                 f"{gb(fit.host_budget)} GB of host memory per rank")
    message = short + "; " + (f"try {change}" if change else "nothing found up to 64x the ranks")
    if not force:
        raise ConfigError(message + ", or pass --force")
    print(message + " (--force: starting anyway)", file=out, flush=True)

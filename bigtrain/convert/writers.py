"""Write a :class:`FullState` as a target engine's checkpoint files (offline, CPU).

- single/ddp: ``model.safetensors`` and ``optimizer.pt``, exactly as ``SingleStrategy`` saves.
- fsdp: a DCP checkpoint of full (unsharded) tensors under the keys ``get_state_dict`` gives;
  DCP reshards it onto any number of ranks on load.
- deepspeed: a universal checkpoint (``deepspeed_universal/``, the layout ``ds_to_universal``
  writes), which DeepSpeed's ``load_universal_checkpoint`` path maps onto any ZeRO stage's flat
  partitions at any world size. DeepSpeed keeps one Adam step per parameter group.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from bigtrain.checkpoint import CheckpointError
from bigtrain.convert.state import FullState, Layout

# Keys that choose torch's kernel, not the math: set for the engine that will load the state.
_KERNEL_KEYS = ("fused", "foreach")


def _groups(state: FullState, kernel: dict[str, Any], ids: dict[str, int] | None = None) -> list[dict]:
    out = []
    for group in state.groups:
        hyper = {k: (tuple(v) if k == "betas" else v) for k, v in group.items() if k != "params"}
        hyper.update({k: kernel.get(k) for k in _KERNEL_KEYS})
        out.append({**hyper, "params": [ids[n] if ids else n for n in group["params"]]})
    return out


def write_state(target: str, state: FullState, layout: Layout, out: Path, cfg, step: int, world_size: int) -> None:
    from bigtrain.optim import _kernel

    if target in ("single", "ddp"):
        # build_optimizer's choice for plain tensors (cpu and cuda take the same kernels)
        write_single(state, layout, out, _kernel(cfg.optim, {"cpu"}))
    elif target == "fsdp":
        write_fsdp(state, layout, out, _kernel(cfg.optim, ()))
    elif target == "deepspeed":
        write_deepspeed(state, layout, out, cfg, step, world_size)
    else:
        raise CheckpointError(f"unknown target engine '{target}'")


def write_single(state: FullState, layout: Layout, out: Path, kernel: dict) -> None:
    from safetensors.torch import save_file

    save_file({**{n: state.weights[n].contiguous() for n in layout.params}, **state.buffers},
              str(out / "model.safetensors"))
    ids = {n: i for i, n in enumerate(layout.params)}
    optimizer = {"state": {ids[n]: state.optim[n] for n in layout.params},
                 "param_groups": _groups(state, kernel, ids)}
    torch.save({"optimizer": optimizer, "scaler": state.scaler or {}}, out / "optimizer.pt")


def write_fsdp(state: FullState, layout: Layout, out: Path, kernel: dict) -> None:
    import torch.distributed.checkpoint as dcp

    from bigtrain.strategies.fsdp import DCP_DIR

    model = {n: state.weights[n] for n in layout.params}
    model.update(state.buffers)
    model.update({alias: state.weights[name] for alias, name in layout.aliases.items()})  # FSDP saves tied keys too
    blob: dict[str, Any] = {"model": model, "optim": {"state": {n: state.optim[n] for n in layout.params},
                                                      "param_groups": _groups(state, kernel)}}
    if state.scaler:
        blob["scaler"] = state.scaler
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": offline, on purpose
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(blob, checkpoint_id=str(out / DCP_DIR), no_dist=True)


def write_deepspeed(state: FullState, layout: Layout, out: Path, cfg, step: int, world_size: int) -> None:
    from importlib.metadata import version

    from safetensors.torch import save_file

    from bigtrain.strategies.deepspeed import TAG, UNIVERSAL_DIR

    root = out / UNIVERSAL_DIR / TAG
    zero = root / "zero"
    steps = []
    for group in state.groups:
        values = {float(state.optim[n]["step"]) for n in group["params"]}
        if len(values) > 1:
            raise CheckpointError(f"DeepSpeed keeps one Adam step per parameter group; this group's parameters "
                                  f"have steps {sorted(values)} (first: {group['params'][0]})")
        steps.append(torch.tensor(values.pop() if values else 0.0))
    for group, group_step in zip(state.groups, steps):
        for name in group["params"]:
            folder = zero / name
            folder.mkdir(parents=True)
            torch.save({"param": state.weights[name], "cat_dim": 0}, folder / "fp32.pt")
            for key in ("exp_avg", "exp_avg_sq"):
                torch.save({"param": state.optim[name][key], "cat_dim": 0}, folder / f"{key}.pt")
            torch.save(group_step.clone(), folder / "step.pt")
    ds_version = version("deepspeed")
    hyper = [{k: list(v) if k == "betas" else v for k, v in g.items() if k != "params"} | {"params": [i]}
             for i, g in enumerate(state.groups)]
    # What both loaders read: ZeRO-1/2 (_load_global_state, param_groups) and ZeRO-3
    # (optimizer_state_dict's step and param_groups). The loss scale is the engine's own.
    optimizer_state = {"ds_version": ds_version, "param_groups": hyper, "clip_grad": cfg.train.grad_clip,
                       "optimizer_state_dict": {"state": {i: {"step": s} for i, s in enumerate(steps)},
                                                "param_groups": hyper}}
    torch.save(optimizer_state, zero / "optimizer_state.pt")
    model_states = {
        "module": {}, "buffer_names": list(layout.buffers), "optimizer": None,
        "param_shapes": [{n: list(layout.shapes[n]) for n in g} for g in layout.groups],
        "frozen_param_shapes": {}, "shared_params": dict(layout.aliases), "frozen_param_fragments": {},
        "lr_scheduler": None, "data_sampler": None, "random_ltd": None, "skipped_steps": 0,
        "global_steps": step, "global_samples": step * cfg.train.global_batch_size,
        "dp_world_size": world_size, "mp_world_size": 1, "ds_version": ds_version,
    }
    # The file name a ZeRO-0/1/2 engine looks for, and ZeRO-3's: one directory serves every stage.
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        torch.save(model_states, root / name)
    if state.buffers:
        save_file(state.buffers, str(out / UNIVERSAL_DIR / "buffers.safetensors"))

"""Read any engine's checkpoint into a :class:`FullState`, offline (no process group, CPU).

- single/ddp: ``model.safetensors`` and ``optimizer.pt`` (torch's state dict: parameters by
  position, in the order :func:`bigtrain.optim.param_groups` builds them).
- fsdp: the DCP checkpoint, loaded whole (``_EmptyStateDictLoadPlanner``, as
  ``dcp_to_torch_save`` does): full tensors by FQN.
- deepspeed (ZeRO 0-3): DeepSpeed's own ``ds_to_universal`` merges the partitions into one
  folder per parameter (``fp32``, ``exp_avg``, ``exp_avg_sq``, ``step``), read from a scratch
  directory.

Every tensor is the fp32 master copy the engine keeps (never a bf16/fp16 compute copy).
"""

from __future__ import annotations

from pathlib import Path

import torch

from bigtrain.checkpoint import CheckpointError
from bigtrain.convert.state import FullState, Layout, hyper


def read_state(strategy: str, ckpt: Path, layout: Layout, scratch: Path) -> FullState:
    if strategy in ("single", "ddp"):
        return read_single(ckpt, layout)
    if strategy == "fsdp":
        return read_fsdp(ckpt, layout)
    if strategy == "deepspeed":
        return read_deepspeed(ckpt, layout, scratch)
    raise CheckpointError(f"{ckpt}: unknown strategy '{strategy}' in manifest")


def _step(value) -> torch.Tensor:
    """Adam's step count as a float32 scalar tensor of its own: torch's Adam increments it in
    place, so one tensor shared by several parameters (ZeRO-3 keeps one per sub-group) would be
    advanced once per parameter (see deepspeed._unshare_steps)."""
    return torch.tensor(float(value), dtype=torch.float32)


def _adam(state: dict) -> dict[str, torch.Tensor]:
    """One parameter's optimizer state, tensors on CPU."""
    out = {}
    for key, value in state.items():
        if key == "step":
            value = _step(value)
        out[key] = value.detach().cpu() if torch.is_tensor(value) else value
    return out


def read_single(ckpt: Path, layout: Layout) -> FullState:
    from safetensors.torch import load_file

    tensors = load_file(str(ckpt / "model.safetensors"))
    blob = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    saved = blob["optimizer"]
    names = layout.params  # torch numbers parameters in group order

    def name(i: int) -> str:
        if not isinstance(i, int) or i >= len(names):
            raise CheckpointError(f"{ckpt / 'optimizer.pt'}: parameter #{i} is not in the model ({len(names)} "
                                  f"parameters)")
        return names[i]

    groups = [{**hyper(g), "params": [name(i) for i in g["params"]]} for g in saved["param_groups"]]
    optim = {name(i): _adam(st) for i, st in saved["state"].items()}
    return FullState(weights={n: tensors[n].float() for n in names if n in tensors}, optim=optim, groups=groups,
                     buffers={n: tensors[n] for n in layout.buffers if n in tensors},
                     scaler=blob.get("scaler") or None)


def read_fsdp(ckpt: Path, layout: Layout) -> FullState:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from bigtrain.strategies.fsdp import DCP_DIR

    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(ckpt / DCP_DIR)),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    model, optim = state.get("model", {}), state.get("optim", {})
    groups = [{**hyper(g), "params": list(g["params"])} for g in optim.get("param_groups", [])]
    return FullState(weights={n: model[n].float() for n in layout.params if n in model},
                     optim={n: _adam(st) for n, st in optim.get("state", {}).items()}, groups=groups,
                     buffers={n: model[n] for n in layout.buffers if n in model}, scaler=state.get("scaler"))


def read_deepspeed(ckpt: Path, layout: Layout, scratch: Path) -> FullState:
    from safetensors.torch import load_file

    from bigtrain.strategies.deepspeed import TAG, UNIVERSAL_DIR, to_universal

    if (ckpt / UNIVERSAL_DIR).is_dir():  # itself converted (from another engine): already universal
        root = ckpt / UNIVERSAL_DIR / TAG / "zero"
    else:
        to_universal(ckpt, scratch / "universal")
        root = scratch / "universal" / TAG / "zero"
    osd = torch.load(root / "optimizer_state.pt", map_location="cpu", weights_only=False)
    zero3 = osd.get("optimizer_state_dict")  # ZeRO-3: one step for every sub-group
    shared_step = zero3["state"][0]["step"] if zero3 and zero3.get("state") else None

    def load(name: str, key: str) -> torch.Tensor | None:
        path = root / name / f"{key}.pt"
        if not path.is_file():
            return None
        value = torch.load(path, map_location="cpu", weights_only=False)
        if key == "step":
            return _step(value)
        tensor = value["param"] if isinstance(value, dict) else value
        numel = torch.Size(layout.shapes[name]).numel()
        return tensor.float().flatten()[:numel].reshape(layout.shapes[name])  # ZeRO-3: padded, flat

    weights, optim = {}, {}
    for name in layout.params:
        weight = load(name, "fp32")
        if weight is None:
            continue  # check() names it
        weights[name] = weight
        moments = {k: t for k in ("exp_avg", "exp_avg_sq") if (t := load(name, k)) is not None}
        step = load(name, "step")
        if step is None and shared_step is not None:
            step = _step(shared_step)
        if step is not None:
            moments["step"] = step
        optim[name] = moments
    saved_groups = osd.get("param_groups") or []
    if len(saved_groups) != len(layout.groups):
        raise CheckpointError(f"{ckpt}: DeepSpeed has {len(saved_groups)} parameter groups, the model "
                              f"{len(layout.groups)}")
    # DeepSpeed's groups are flat partitions: their members are the model's groups, in order.
    groups = [{**hyper(g), "params": list(names)} for g, names in zip(saved_groups, layout.groups)]
    buffers_file = ckpt / UNIVERSAL_DIR / "buffers.safetensors"
    buffers = load_file(str(buffers_file)) if buffers_file.is_file() else _ds_buffers(ckpt, layout)
    return FullState(weights=weights, optim=optim, groups=groups, buffers=buffers)


def _ds_buffers(ckpt: Path, layout: Layout) -> dict[str, torch.Tensor]:
    """Persistent buffers from DeepSpeed's model-states file (ZeRO does not partition buffers)."""
    if not layout.buffers:
        return {}
    from bigtrain.strategies.deepspeed import DS_DIR, TAG

    files = sorted((ckpt / DS_DIR / TAG).glob("*model_states.pt"))
    if not files:
        return {}
    module = torch.load(files[0], map_location="cpu", weights_only=False).get("module") or {}
    return {n: module[n] for n in layout.buffers if n in module}

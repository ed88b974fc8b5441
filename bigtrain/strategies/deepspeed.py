"""DeepSpeed ZeRO stages 0-3 with optional CPU offload, configured from the bigtrain config.

The DeepSpeed JSON is generated (``deepspeed_config``) from bigtrain's keys: batch sizes,
gradient accumulation, clipping, precision, ZeRO stage, bucket sizes scaled to the model, and
offload. ``strategy.deepspeed.extra`` is merged on top (escape hatch) and the result is
validated by DeepSpeed's own config parser. Checkpoints are DeepSpeed's native ones; resuming
on a different world size converts them to a universal checkpoint first (``ds_to_universal``).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigtrain import dist
from bigtrain.checkpoint import CheckpointError, derived_dir, fault_point
from bigtrain.config import RunConfig, deep_merge
from bigtrain.dist import LOW_PRECISION
from bigtrain.models import batch_norms
from bigtrain.models.params import param_count
from bigtrain.optim import build_optimizer, param_groups
from bigtrain.strategies import memory
from bigtrain.strategies.base import (
    Strategy,
    enable_activation_checkpointing,
    to_device,
)
from bigtrain.strategies.single import load_full_state

DS_DIR = "deepspeed"
TAG = "state"
# A checkpoint converted from another engine (bigtrain.convert): a universal checkpoint, loadable
# by every ZeRO stage at any world size, in place of DS_DIR.
UNIVERSAL_DIR = "deepspeed_universal"


def _bucket(n_params: int) -> int:
    """Communication bucket (elements): DeepSpeed's 5e8 default reserves GBs for small models."""
    return int(min(5e8, max(1e5, n_params // 4)))


def deepspeed_config(cfg: RunConfig, world_size: int, n_params: int) -> dict[str, Any]:
    ds = cfg.strategy.deepspeed
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "reduce_bucket_size": _bucket(n_params),
        "allgather_bucket_size": _bucket(n_params),
        "overlap_comm": False,
        "contiguous_gradients": True,
    }
    if ds.stage == 3:
        zero.update({"stage3_prefetch_bucket_size": _bucket(n_params),
                     "stage3_param_persistence_threshold": int(min(1e5, n_params // 100)),
                     "stage3_gather_16bit_weights_on_model_save": False})
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps(world_size),
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if ds.offload_optimizer or ds.offload_param:
        # ZeRO-Offload steps on the CPU with DeepSpeed's own (CPU) Adam.
        opt = cfg.optim
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": opt.lr, "betas": [opt.beta1, opt.beta2], "eps": opt.eps, "weight_decay": opt.weight_decay}}
    return deep_merge(config, ds.extra)


def loads_partitioned(cfg: RunConfig) -> bool:
    """Whether ZeRO-3 builds ``model.pretrained`` partitioned (full fine-tuning of a causal LM,
    ``strategy.deepspeed.pretrained_from: rank0``): rank 0 reads the checkpoint, every rank keeps
    its partitions. (By default every rank maps the safetensors file, which transformers reads
    lazily onto a meta-built model, and ZeRO partitions it: measured, no higher peak.)"""
    ds = cfg.strategy.deepspeed
    return (ds.stage == 3 and ds.pretrained_from == "rank0" and bool(cfg.model.pretrained) and cfg.model.lora is None
            and cfg.task in ("causal_lm", "sft"))


@contextlib.contextmanager
def model_init_context(cfg: RunConfig, info):
    """While transformers' ``HfDeepSpeedConfig`` lives, ``from_pretrained`` builds the model under
    ``deepspeed.zero.Init`` (each parameter partitioned as it is created) and loads the checkpoint
    into the partitions (rank 0 reads the values, the other ranks only shapes). It lives for the
    model's construction alone: a distillation teacher built later must stay whole."""
    if not loads_partitioned(cfg):
        yield
        return
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    # over the process group that exists (as deepspeed.initialize does later): zero.Init partitions
    # across it, and its config check reads the world size from it
    deepspeed.comm.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                    dist_init_required=False)
    # zero.Init reads the stage, precision and offload keys; buckets are sized at initialize
    hf_config = HfDeepSpeedConfig(deepspeed_config(cfg, info.world_size, n_params=0))
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_config


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    engine = None
    partitioned = False  # the model arrived built under zero.Init (see loads_partitioned)

    def setup(self, model: nn.Module) -> None:
        import deepspeed

        if self.cfg.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        if self.cfg.strategy.activation_checkpointing:
            enable_activation_checkpointing(model)
        low = LOW_PRECISION.get(self.cfg.precision)
        if low is not None:  # DeepSpeed casts parameters, not buffers: BatchNorm statistics must follow
            for norm in batch_norms(model):
                norm.to(low)
        n_params = param_count(model)
        self.partitioned = any(hasattr(p, "ds_id") for p in model.parameters())  # built under zero.Init
        self.ds_config = deepspeed_config(self.cfg, self.info.world_size, n_params)
        groups = param_groups(model, self.cfg.optim.weight_decay)
        optimizer = None
        if "optimizer" not in self.ds_config:  # the client optimizer; ZeRO hands it flat partitions (auto: foreach)
            optimizer = build_optimizer(groups, self.cfg.optim)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=groups if optimizer is None else None,
            config=self.ds_config, dist_init_required=False)
        if self.cfg.train.compile:
            self.engine.compile()  # torch.compile of the wrapped module (DeepSpeed's own entry point)
        self.model = self.engine
        self.input_dtype = low

    def precision_context(self):
        return contextlib.nullcontext()  # the engine holds bf16/fp16 parameters itself

    def details(self) -> str:
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)  # ZeRO wraps it
        note = " (offloaded)" if self.engine.zero_cpu_offload() else ""
        if self.cfg.optim.name == "adafactor" and self.engine.zero_optimization_stage() > 0:
            note = " (unfactored: ZeRO's flat partitions)"  # see bigtrain/optim.py
        compiled = ", compiled" if self.engine.is_compiled else ""
        loaded = ", model.pretrained read into partitions (zero.Init)" if self.partitioned else ""
        return (f"ZeRO-{self.engine.zero_optimization_stage()}, optimizer {type(inner).__name__}{note}{compiled}"
                f"{loaded}")

    def close(self) -> None:
        # ZeRO's gradient hooks reach the engine from C++, so without destroy() the engine and
        # its process groups live until interpreter exit (where gloo aborted a finished run).
        # (ZeRO-3 still keeps its model in module-level caches; python -m bigtrain.train exits
        # without interpreter teardown for that reason.)
        if self.engine is not None:
            self.engine.destroy()
            self.engine = self.model = self.optimizer = None

    def forward_backward(self, batch, scale, last_micro):
        # DeepSpeed divides by its gradient_accumulation_steps itself (== 1/scale) and steps only
        # at the accumulation boundary, so the engine is called on every micro-batch.
        loss = self.objective(self.engine, to_device(batch, self.device, self.input_dtype))
        self.engine.backward(loss)
        if not last_micro:
            self.engine.step()
        return loss.detach().float()

    def step(self, lr):
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(norm if norm is not None else float("nan"), dtype=torch.float32)

    # -- checkpoints: DeepSpeed native -----------------------------------------------------
    def save(self, directory: Path) -> None:
        # LoRA: the trainable parameters alone (the rest is model.pretrained)
        self.engine.save_checkpoint(str(directory / DS_DIR), tag=TAG, save_latest=False,
                                    exclude_frozen_parameters=bool(self.cfg.model.lora))
        fault_point("checkpoint-engine-write")

    def load(self, directory: Path) -> None:
        manifest = json.loads((directory / "manifest.json").read_text())
        source = directory / DS_DIR
        if (directory / UNIVERSAL_DIR).is_dir():  # converted from another engine
            source = directory / UNIVERSAL_DIR
            self.engine._config.load_universal_checkpoint = True
        elif manifest["world_size"] != self.info.world_size:
            if self.cfg.optim.name != "adamw":  # ds_to_universal converts fp32, exp_avg and exp_avg_sq only
                raise CheckpointError(
                    f"{directory}: written on {manifest['world_size']} ranks; DeepSpeed's universal checkpoint (for "
                    f"another world size) carries Adam's state only, so optim.name {self.cfg.optim.name} resumes on "
                    f"{manifest['world_size']} ranks")
            source = self._universal(directory)
            self.engine._config.load_universal_checkpoint = True
        # DeepSpeed's universal loader copies group 0's hyper-parameters into every group, which
        # would put weight decay on biases and norms: keep the configured ones.
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.engine.optimizer.param_groups]
        path, _ = self.engine.load_checkpoint(str(source), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False,
                                              load_module_strict=not self.cfg.model.lora)
        for group, saved in zip(self.engine.optimizer.param_groups, hyper):
            group.update(saved)
        _unshare_steps(getattr(self.engine.optimizer, "optimizer", self.engine.optimizer))
        self.engine._config.load_universal_checkpoint = False
        if path is None:
            raise RuntimeError(f"{source}: DeepSpeed could not load the checkpoint")
        buffers = directory / UNIVERSAL_DIR / "buffers.safetensors"
        if buffers.is_file():  # a universal load restores parameters alone
            from safetensors.torch import load_file

            self.engine.module.load_state_dict(load_file(str(buffers), device=str(self.device)), strict=False)

    def _universal(self, directory: Path) -> Path:
        """Collective: convert to a universal checkpoint (once, beside the checkpoint, as
        ``.step-N.universal``) for a new world size. Written under a temporary name and renamed,
        so a conversion killed half-way is redone, not reused."""
        out = derived_dir(directory, "universal")

        def convert() -> None:
            if out.is_dir():
                return
            print(f"checkpoint: converting {directory.name} to a universal checkpoint ({out.name}) "
                  f"for {self.info.world_size} ranks", flush=True)
            to_universal(directory, out)

        dist.run_on_main(convert, self.info.is_main)
        return out

    def full_model_state(self):
        if self.cfg.strategy.deepspeed.stage == 3:
            import deepspeed

            params = list(self.engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return {k: v.detach().float().cpu().clone() for k, v in self.engine.module.state_dict().items()}
        return {k: v.detach().float().cpu() for k, v in self.engine.module.state_dict().items()}

    def generation_model(self):
        return self.engine

    def memory_report(self):
        opt = self.engine.optimizer
        params = list(self.engine.module.parameters())
        # ZeRO-3 replaces parameters by empty placeholders and keeps this rank's partition in ds_tensor.
        local = [getattr(p, "ds_tensor", p) for p in params]
        report = {
            "param_bytes": memory.tensor_bytes(local),
            "grad_bytes": 0,
            "optimizer_state_bytes": 0,
            **memory.peak_bytes(self.device),
        }
        inner = getattr(opt, "optimizer", opt)  # ZeRO wraps the torch optimizer
        report["optimizer_state_bytes"] = memory.optimizer_state_bytes(inner)
        masters = (getattr(opt, "single_partition_of_fp32_groups", None)
                   or getattr(opt, "fp32_partitioned_groups_flat", None) or [])
        report["ds_fp32_master_partition_bytes"] = memory.tensor_bytes(masters)
        grads = getattr(opt, "averaged_gradients", None) or {}
        grad_list = [g for v in (grads.values() if isinstance(grads, dict) else grads) for g in (v or [])]
        grad_list += list(getattr(opt, "fp32_groups_gradients_flat", None) or [])  # BF16_Optimizer (stage 0)
        report["grad_bytes"] = memory.tensor_bytes(grad_list) or self._gradient_bytes(params)
        buckets = self.ds_config["zero_optimization"]["reduce_bucket_size"]
        # from the configured bucket size: DeepSpeed allocates it inside backward
        report["ds_reduce_bucket_bytes_estimate"] = int(buckets) * (2 if self.cfg.precision != "fp32" else 4)
        return report


    def _gradient_bytes(self, params: list[nn.Parameter]) -> int:
        """What backward holds when DeepSpeed's gradient lists are empty (they are released by the
        step): one gradient per parameter in the parameters' dtype, whole up to ZeRO-1 (reduced at
        the accumulation boundary), this rank's partition from ZeRO-2."""
        whole = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in {id(p): p for p in params}.values())
        return whole if self.engine.zero_optimization_stage() <= 1 else -(-whole // self.info.world_size)


def to_universal(directory: Path, out: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` of checkpoint ``directory`` into ``out/TAG``: one folder per
    parameter (fp32 master, Adam moments, step). Written under a temporary name and renamed, so a
    conversion killed half-way is redone, not reused."""
    import shutil

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # --inject_missing_state: ZeRO-1/2 checkpoints of a plain (data-parallel only) model
    # carry no universal_checkpoint_info, which the converter otherwise insists on.
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                           "--input_folder", str(directory / DS_DIR / TAG), "--output_folder", str(tmp / TAG),
                           "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"{directory}: ds_to_universal failed (exit {proc.returncode}): " + " | ".join(tail))
    tmp.rename(out)


def _unshare_steps(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter's Adam state its own ``step`` tensor.

    ZeRO-3's universal loader (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) puts one
    and the same ``step`` tensor into the state of every sub-group. ZeRO-3 steps the sub-groups one
    after another, and torch's Adam increments ``step`` in place, so each optimizer step advanced
    the shared counter once per sub-group: from the second group on, Adam's bias correction used a
    step count that ran ahead (10, 12, ... instead of 9, 10, ...) and the losses drifted.
    """
    seen: set[int] = set()
    for state in optimizer.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
            seen.add(id(step))


def load_consolidated(model: nn.Module, directory: Path, partial: bool = False) -> None:
    """Load a DeepSpeed checkpoint's fp32 weights (all ZeRO partitions merged) into a plain model
    (``partial``: a LoRA checkpoint, which holds the trainable parameters alone)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    universal = Path(directory) / UNIVERSAL_DIR / TAG / "zero"
    if universal.is_dir():  # converted from another engine: the fp32 masters, one file per parameter
        state = {p.parent.name: torch.load(p, map_location="cpu", weights_only=False)["param"]
                 for p in sorted(universal.glob("*/fp32.pt"))}
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(Path(directory) / DS_DIR), tag=TAG,
                                                         exclude_frozen_parameters=partial)
    load_full_state(model, state, f"{directory}: DeepSpeed weights", partial)

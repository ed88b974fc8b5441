"""One process, one device: the reference every other engine must match."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bigtrain.checkpoint import fault_point
from bigtrain.models.lora import trainable_names
from bigtrain.optim import build_optimizer, param_groups
from bigtrain.strategies import memory
from bigtrain.strategies.base import (
    Strategy,
    enable_activation_checkpointing,
    to_device,
)


class SingleStrategy(Strategy):
    name = "single"
    _writer: ThreadPoolExecutor | None = None

    def setup(self, model: nn.Module) -> None:
        if self.cfg.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        if self.cfg.strategy.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.raw_model = model.to(self.device)
        groups = param_groups(self.raw_model, self.cfg.optim.weight_decay)
        devices = {p.device.type for g in groups for p in g["params"]}
        self.optimizer = build_optimizer(groups, self.cfg.optim, devices)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.cfg.precision == "fp16")
        self.model = torch.compile(self.raw_model) if self.cfg.train.compile else self.raw_model
        # Training compiles the objective, the model's forward and the loss in one graph (the
        # logits' upcast and log-softmax fuse into the loss kernels); evaluation compiles the model.
        self.train_objective = torch.compile(self.objective) if self.cfg.train.compile else self.objective

    def details(self) -> str:
        compiled = hasattr(self.model, "_orig_mod")  # torch.compile's OptimizedModule
        return super().details() + (", compiled" if compiled else "")

    def forward_backward(self, batch, scale, last_micro):
        with self.precision_context():
            loss = self.train_objective(self.raw_model, to_device(batch, self.device))
        self.scaler.scale(loss * scale).backward()
        return loss.detach()

    def step(self, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        max_norm = self.cfg.train.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _snapshot(self, copy: bool) -> tuple[dict, dict]:
        """Model and optimizer state on CPU; ``copy`` clones tensors so training may go on."""
        def detach(t):
            return t.detach().to("cpu", copy=True) if copy else t.detach().cpu()

        keep = trainable_names(self.raw_model) if self.cfg.model.lora else None  # LoRA: the adapters alone
        model = _untie({k: detach(v).contiguous() for k, v in self.raw_model.state_dict().items()
                        if keep is None or k in keep})
        optim = self.optimizer.state_dict()
        if copy:
            optim = {"state": {i: {k: detach(v) if torch.is_tensor(v) else v for k, v in st.items()}
                               for i, st in optim["state"].items()},
                     "param_groups": [dict(g) for g in optim["param_groups"]]}
        return model, {"optimizer": optim, "scaler": self.scaler.state_dict()}

    @staticmethod
    def _write(directory: Path, model: dict, optim: dict) -> None:
        save_file(model, str(directory / "model.safetensors"))
        fault_point("checkpoint-engine-write")
        torch.save(optim, directory / "optimizer.pt")

    def save(self, directory: Path) -> None:
        self._write(directory, *self._snapshot(copy=False))

    def async_save(self, directory: Path) -> Future:
        """Copy the state to CPU now (fast), write the files in a background thread."""
        model, optim = self._snapshot(copy=True)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer")
        return self._writer.submit(self._write, directory, model, optim)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def load(self, directory: Path) -> None:
        load_model_file(self.raw_model, directory, self.device, partial=bool(self.cfg.model.lora))
        blob = torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scaler.load_state_dict(blob["scaler"])

    def full_model_state(self):
        return {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()}

    def generation_model(self):
        return self.raw_model

    def memory_report(self):
        return memory.report(self.raw_model, self.optimizer, self.device)


def load_model_file(model: nn.Module, directory: Path, device: torch.device | str = "cpu",
                    partial: bool = False) -> None:
    """Load ``directory/model.safetensors`` (full, unsharded weights) into ``model``."""
    load_full_state(model, load_file(str(directory / "model.safetensors"), device=str(device)),
                    f"{directory}/model.safetensors", partial)


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor], where: str, partial: bool = False) -> None:
    """Load full (unsharded) weights; tied weights may be absent, and with ``partial`` (LoRA
    checkpoints: the trainable parameters alone) every frozen one. ValueError naming ``where`` if
    the keys do not match the model."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if partial:  # what must be there: the parameters that train
        missing = [k for k in missing if k in trainable_names(model)]
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise ValueError(f"{where} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def _is_tied(model: nn.Module, key: str) -> bool:
    return key in (getattr(model, "_tied_weights_keys", None) or ()) or key.endswith("lm_head.weight")


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: keep one copy of tied weights."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen[ptr] = k
        out[k] = v
    return out

"""``model.sync_batchnorm``: BatchNorm whose training statistics cover every rank's micro-batch.

On accelerators this is torch's ``nn.SyncBatchNorm``. torch refuses it on CPU (its forward and
DDP both raise), so there :class:`SyncBatchNorm`, a plain BatchNorm subclass, computes the same
statistics (gloo) with two differentiable all-reduces (sums and counts, then the centred squares):
the mean and the biased variance over all ranks' samples normalize, the unbiased one goes into
the running variance, as in ``nn.BatchNorm``. Gradients flow back through the all-reduces, so
each rank's input gradient includes the other ranks' losses, as one process over the union of
the micro-batches would compute it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the default process group's concurrent batches (any input with channels in dim 1)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        group = dist.group.WORLD
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        local = torch.cat([input.sum(dims), input.new_tensor([input.numel() // input.shape[1]])])
        total = all_reduce(local, group=group)
        count = total[-1]
        mean = total[:-1] / count
        centred = input - mean.view(shape)
        var = all_reduce(centred.square().sum(dims), group=group) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * count / (count - 1), factor)
        return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm layer synced: torch's ``nn.SyncBatchNorm`` on accelerators,
    :class:`SyncBatchNorm` on CPU (same parameters and buffers: state dicts keep their keys)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        sync = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)
        if module.affine:
            sync.weight, sync.bias = module.weight, module.bias
        sync.running_mean, sync.running_var = module.running_mean, module.running_var
        sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module

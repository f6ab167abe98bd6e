"""Data parallelism: DDP wrapping and unwrapping, synchronized BatchNorm (GPU and CPU), no_sync.

torch.nn.SyncBatchNorm runs only on CUDA tensors. ``GlooSyncBatchNorm`` gives CPU (gloo) runs the
same statistics over the global batch, through torch's differentiable all_reduce, so SyncBN can be
tested on any machine and CPU ranks train like GPU ranks.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, ContextManager

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP


def _global_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks that autograd can differentiate (its backward is a sum of the gradients).

    torch's functional collectives are the supported differentiable all_reduce (the older
    torch.distributed.nn.functional one is deprecated)."""
    world = dist.group.WORLD
    assert world is not None, "the process group is initialised before any collective"
    return funcol.wait_tensor(funcol.all_reduce(x, "sum", world))


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed over all ranks' samples.

    Two all_reduces per layer: the global mean first, then the global centred sum of squares (the
    two-pass form keeps the variance as accurate as plain BatchNorm's). Gradients flow through the
    all_reduces, which is what makes the backward pass match BatchNorm on the concatenated batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = (0, 2, 3)
        out_dtype, x = x.dtype, x.float()  # statistics in fp32, as BatchNorm does under autocast
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = torch.cat([count, x.sum(dims)])
        stats = _global_sum(stats)
        n, mean = stats[0], stats[1:] / stats[0]
        centred = x - mean[None, :, None, None]
        var = _global_sum(centred.pow(2).sum(dims)) / n
        self._update_running_stats(mean.detach(), var.detach(), n.detach())
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(out_dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        tracked, running_mean, running_var = self.num_batches_tracked, self.running_mean, self.running_var
        if not self.track_running_stats or tracked is None or running_mean is None or running_var is None:
            return
        tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(tracked)
        unbiased = var * n / (n - 1).clamp(min=1)  # running_var is unbiased, as in BatchNorm
        running_mean.lerp_(mean, momentum)
        running_var.lerp_(unbiased, momentum)


def _swap_batchnorm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlooSyncBatchNorm):
        new = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _swap_batchnorm(child))
    return module


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers that synchronise statistics across ranks: torch's on CUDA, ours elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _swap_batchnorm(model)


# DDP renamed broadcast_buffers to forward_sync_buffers (same meaning); use whichever this torch has.
_SYNC_BUFFERS: dict[str, Any] = ({"forward_sync_buffers": True} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                 else {"broadcast_buffers": True})


def wrap_ddp(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """DDP around ``model`` when there is more than one rank; the model itself otherwise."""
    if world_size == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    # Buffers (BatchNorm running stats) are broadcast from rank 0 each forward, so every rank
    # evaluates and checkpoints the same model.
    return DDP(model, device_ids=ids, gradient_as_bucket_view=True, **_SYNC_BUFFERS)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP and torch.compile wrappers (plain state_dict keys, eval without hooks)."""
    while True:
        if isinstance(model, DDP):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def maybe_no_sync(model: nn.Module, sync: bool) -> ContextManager[None]:
    """DDP's no_sync on accumulation micro-steps that must not all-reduce gradients yet."""
    if sync or not isinstance(model, DDP):
        return contextlib.nullcontext()
    return model.no_sync()


"""Data parallelism: DDP wrapping and unwrapping (and the ``module.`` / ``_orig_mod.`` key prefixes wrappers
add), synchronized BatchNorm (GPU and CPU), no_sync.

torch.nn.SyncBatchNorm runs only on CUDA tensors. ``GlooSyncBatchNorm`` gives CPU (gloo) runs the
same statistics over the global batch, through torch's differentiable all_reduce, so SyncBN can be
tested on any machine and CPU ranks train like GPU ranks.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from typing import Any, ContextManager

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainers.core.data import tree_map
from trainers.core.sharding import ShardPlan, gradient_sync, shard


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
        # The original Parameter and buffer objects, as torch's own conversion keeps them: their requires_grad
        # (model.freeze, a recipe's frozen scales) and any optimizer or hook that already holds them stay valid.
        with torch.no_grad():
            if module.affine:
                new.weight, new.bias = module.weight, module.bias
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(new, name, getattr(module, name))
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


def spread(model: nn.Module, device: torch.device, world_size: int, *, sync_bn: bool, channels_last: bool,
           compile: bool, sharding: ShardPlan | None = None) -> nn.Module:
    """The model as every rank trains it: BatchNorm synchronised across ranks (``sync_bn``), on the device,
    NHWC (``channels_last``), compiled (``compile``, inside DDP so that no_sync and unwrap see DDP on the
    outside) and wrapped in DDP when there is more than one rank; or, with a ``sharding`` plan and more than one
    rank, sharded by FSDP2 instead of DDP."""
    if sharding is not None and world_size > 1:
        # The weights stay NCHW: FSDP2 keeps each shard as a flat view of a contiguous tensor (channels_last inputs
        # still reach the convolutions as the model.channels_last key says).
        return shard(model, device, world_size, sharding)
    if sync_bn and world_size > 1:
        model = convert_sync_batchnorm(model, device)
    model = model.to(device)
    if channels_last:
        # The stubs of some torch releases leave memory_format out of Module.to's overloads.
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload, unused-ignore]
    if compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return wrap_ddp(model, device, world_size)


def broadcast_buffers(model: nn.Module) -> None:
    """Every rank takes rank 0's buffers (BatchNorm running statistics drift apart across ranks after the last
    forward; rank 0's are the ones checkpointed). A collective; a no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        for buf in unwrap(model).buffers():
            dist.broadcast(buf, src=0)


def to_memory_format(batch: Any, channels_last: bool) -> Any:
    """4-D float tensors of ``batch`` in NHWC when the model is (others as they are)."""
    if not channels_last:
        return batch
    return tree_map(lambda t: t.contiguous(memory_format=torch.channels_last)
                    if t.dim() == 4 and t.is_floating_point() else t, batch)


def maybe_no_sync(model: nn.Module, sync: bool) -> ContextManager[None]:
    """DDP's no_sync (FSDP's deferred reduce-scatter) on accumulation micro-steps that must not reduce
    gradients yet."""
    if sync:
        return contextlib.nullcontext()
    if isinstance(model, DDP):
        return model.no_sync()
    return gradient_sync(model, sync)


def _strip_key(key: str, prefixes: tuple[str, ...] = ("module.", "_orig_mod.")) -> str:
    stripped = True
    while stripped:  # wrappers nest: DDP(compile(model)) gives "module._orig_mod.", and vice versa
        stripped = False
        for p in prefixes:
            if key.startswith(p):
                key, stripped = key[len(p):], True
    return key


def strip_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop leading ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) from keys, however nested.

    A checkpoint of a wrapped model then loads into the bare model. Raises ValueError if two keys
    become the same (the dict mixed wrapped and bare names).
    """
    out: OrderedDict[str, Any] = OrderedDict()
    for key, value in state_dict.items():
        new = _strip_key(key) if isinstance(key, str) else key
        if new in out:
            raise ValueError(f"strip_prefixes: keys collide on {new!r} (from {key!r}); the state dict mixes "
                             "wrapped and unwrapped parameter names")
        out[new] = value
    # load_state_dict reads per-module versions from _metadata (e.g. BatchNorm); keep it under the new
    # names. Its keys are module paths, so the wrapper itself ("module") maps to the root ("").
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            (_strip_key(k + ".")[:-1] if k else k, v) for k, v in meta.items())
    return out

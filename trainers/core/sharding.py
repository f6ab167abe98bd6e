"""Sharded data parallelism (``dist.strategy=fsdp``): FSDP2 (``torch.distributed.fsdp.fully_shard``) on each
unit of the model and then on its root, the sharded and full states a checkpoint and ``model.pt`` need, and
the checks that keep unsupported combinations out.

    model = shard(model, device, world_size, ShardPlan(units="", precision=Precision.bf16))
    ModelShards(model), OptimizerShards(model, optimizer)   # the registry's entries under FSDP
    full_state_dict(model)                   # every parameter whole, on rank 0's CPU (a collective)

Each rank keeps 1/world_size of every parameter, gradient and optimizer state; a unit's parameters are
all-gathered just before its forward (and backward) and freed after. The checkpoint of a sharded run is
written by every rank (``trainers.core.checkpoint.sharded``) and loads at any world size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator

import torch
import torch.nn as nn

from launcher.errors import UserError
from trainers.core.config import Precision

__all__ = ["ShardPlan", "shard_plan", "shard", "shard_units", "is_sharded", "gradient_sync", "ModelShards", "OptimizerShards",
           "full_state_dict", "check_strategy", "local"]


def shard_plan(cfg: Any, device: torch.device) -> ShardPlan | None:
    """The plan of ``dist.strategy=fsdp`` for a resolved config on ``device`` (None for ddp), after refusing, with
    the fix, the settings FSDP does not combine with here."""
    if cfg.dist.strategy != "fsdp":
        return None
    check_strategy(sync_bn=cfg.model.sync_bn, precision=cfg.train.precision, compile=bool(cfg.model.compile),
                   nonfinite=cfg.train.nonfinite)
    if cfg.model.cpu_offload and device.type != "cuda":
        raise UserError(f"model.cpu_offload=true moves the shards of a GPU run to host memory, but this run trains on "
                        f"{device.type}, where they already are: set model.cpu_offload=false.")
    return ShardPlan(cfg.model.shard_units, cfg.train.precision, cfg.model.activation_checkpointing,
                     cfg.model.cpu_offload)


def check_strategy(*, sync_bn: bool, precision: Precision, compile: bool, nonfinite: str) -> None:
    """Refuse the settings that FSDP does not combine with here."""
    problems = []
    if sync_bn:
        problems.append("model.sync_bn=true (BatchNorm statistics are not synchronised across FSDP shards here; "
                        "set model.sync_bn=false, or use dist.strategy=ddp)")
    if precision is Precision.fp16:
        problems.append("train.precision=fp16 (a sharded model needs a sharded gradient scaler; use bf16, which "
                        "needs no scaler, or fp32)")
    if compile:
        problems.append("model.compile=true (compile each block yourself, or set model.compile=false)")
    if nonfinite == "skip":
        problems.append("train.nonfinite=skip (each rank sees only its shard of the gradients; use "
                        "train.nonfinite=stop)")
    if problems:
        raise UserError("dist.strategy=fsdp cannot be combined with " + "; ".join(problems) + ".")


def shard_units(model: nn.Module, names: str = "") -> list[nn.Module]:
    """The modules sharded one by one: those ``names`` (comma-separated dotted paths, e.g. ``blocks.0,blocks.1``
    or ``layer1,layer2``), else each block of a ``blocks`` list (transformers), else the top-level children."""
    if names:
        modules = dict(model.named_modules())
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in modules]
        if unknown:
            top = ", ".join(name for name, _ in model.named_children())
            raise UserError(f"model.shard_units names {', '.join(unknown)}, which the model does not have; its "
                            f"top-level parts are: {top} (nested ones by dotted path, e.g. blocks.0).")
        return [modules[n] for n in wanted]
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        return list(blocks)
    return [child for child in model.children() if any(True for _ in child.parameters())]


@dataclass(frozen=True)
class ShardPlan:
    """How ``dist.strategy=fsdp`` shards a model: the units (``model.shard_units``), the precision of gathered
    parameters, and activation checkpointing per unit."""

    units: str = ""
    precision: Precision = Precision.fp32
    checkpointing: bool = False
    offload: bool = False  # model.cpu_offload: shards in host memory (GPU runs)


def shard(model: nn.Module, device: torch.device, world_size: int, plan: ShardPlan) -> nn.Module:
    """``model`` on ``device``, each unit and then the root sharded over all ranks (FSDP2). In bf16 the parameters
    are gathered in bf16 and gradients reduced in fp32; ``plan.checkpointing`` recomputes each unit's activations
    in the backward pass instead of keeping them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    units = shard_units(model, plan.units)
    model = model.to(device)
    mesh = init_device_mesh(device.type, (world_size,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if plan.precision is Precision.bf16 else MixedPrecisionPolicy())
    offload = CPUOffloadPolicy() if plan.offload else OffloadPolicy()
    for unit in units:
        if plan.checkpointing:
            _checkpoint_activations(unit)
        fully_shard(unit, mesh=mesh, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)
    return model


def _checkpoint_activations(unit: nn.Module) -> None:
    """Recompute ``unit``'s forward during the backward pass (torch.utils.checkpoint, non-reentrant)."""
    from torch.utils.checkpoint import checkpoint

    forward = unit.forward

    def recomputed(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    unit.forward = recomputed  # type: ignore[method-assign, unused-ignore]


def is_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def gradient_sync(model: nn.Module, sync: bool) -> ContextManager[None]:
    """On accumulation micro-steps (``sync`` False) FSDP keeps gradients unreduced until the last one."""
    if sync or not is_sharded(model):
        return contextlib.nullcontext()
    return _no_gradient_sync(model)


@contextlib.contextmanager
def _no_gradient_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (DTensor), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


class ModelShards:
    """The registry's ``model`` entry of a sharded run: each rank's shards (DTensors, resharded on load to
    whatever world size reads them)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state)


class OptimizerShards:
    """The registry's ``optimizer`` entry of a sharded run: the optimizer state by parameter name, sharded."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, state)


def full_state_dict(model: nn.Module) -> dict[str, Any]:
    """Every weight whole, in host memory on rank 0 (empty elsewhere): what ``model.pt`` holds. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

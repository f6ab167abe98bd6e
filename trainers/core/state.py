"""What a checkpoint holds, as a registry of stateful objects.

Anything with ``state_dict()`` / ``load_state_dict()`` (torch's ``Stateful`` protocol) is registered
under a name: the model, optimizer, schedule, scaler, training progress, and whatever the task
registers (``Task.state()``). Saving and restoring walk the registry, so a task's own state is
checkpointed without any edit to the trainer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import torch.nn as nn

from launcher.config import ConfigError
from launcher.errors import CheckpointError
from trainers.core.parallel import strip_prefixes, unwrap
from trainers.core.sharding import ModelShards, OptimizerShards

__all__ = ["Stateful", "TrainState", "ModelState", "Registry", "weights_and_optimizer"]


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict()``: the protocol of torch.distributed.checkpoint's
    ``Stateful`` (declared here: importing that module costs most of a second at every start)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """Where training stands; with the seed it fixes every sample (and random transform) still to come.

    The seed lives here and only here: the sampler and the per-sample seeds read it each epoch, and a
    resumed run takes the saved one.
    """

    seed: int = 0
    global_batch_size: int = 0  # an exact mid-epoch resume needs the same global batch
    epoch: int = 0  # current epoch, 0-based
    step_in_epoch: int = 0  # optimizer steps done inside ``epoch``
    global_step: int = 0  # optimizer steps done in total

    def advance(self) -> int:
        """One optimizer step done; returns the new global step."""
        self.step_in_epoch += 1
        self.global_step += 1
        return self.global_step

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the saved position and seed; the global batch stays this run's, and must be the saved one
        to resume in the middle of an epoch (the rest of the epoch is cut into batches of that size)."""
        saved_batch = state.get("global_batch_size")
        if state.get("step_in_epoch") and saved_batch != self.global_batch_size:
            raise ConfigError(
                f"The checkpoint stopped mid-epoch with train.batch_size={saved_batch}, but this run has "
                f"train.batch_size={self.global_batch_size}; an exact resume needs the same global batch. Set it "
                "back, or start fresh with checkpoint.resume=never in a new run.dir.")
        for key, value in state.items():
            if key != "global_batch_size":
                setattr(self, key, value)


class ModelState:
    """A model's weights with plain keys (no ``module.`` / ``_orig_mod.``), whatever wraps it now."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return strip_prefixes(unwrap(self.model).state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            unwrap(self.model).load_state_dict(strip_prefixes(state))
        except RuntimeError as e:  # missing, unexpected or differently shaped weights
            details = "; ".join(line.strip() for line in str(e).splitlines()[1:4])
            raise CheckpointError(
                f"The checkpoint's weights do not fit this model ({details} ...): it was written by a run of a "
                "different model (model.name, model.width, number of classes). Resume it with the settings it was "
                "written with, start fresh in a new run.dir, or take what fits with model.init_from=PATH."
            ) from None


class Registry:
    """Named stateful objects, saved and restored together."""

    def __init__(self, objects: dict[str, Any] | None = None) -> None:
        self.objects: dict[str, Stateful] = {}
        for name, obj in (objects or {}).items():
            self.register(name, obj)

    def register(self, name: str, obj: Stateful) -> None:
        if name in self.objects:
            raise ValueError(f"checkpoint state '{name}' is registered twice")
        if not isinstance(obj, Stateful):
            raise TypeError(f"checkpoint state '{name}' ({type(obj).__name__}) needs state_dict() and "
                            "load_state_dict()")
        self.objects[name] = obj

    def state_dict(self) -> dict[str, Any]:
        return {name: obj.state_dict() for name, obj in self.objects.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [name for name in self.objects if name not in state]
        if missing:
            raise CheckpointError(
                f"The checkpoint holds no state for {', '.join(missing)} (it was written by a task that did not "
                "register it). Resume with the task that wrote it, or start fresh with checkpoint.resume=never in "
                "a new run.dir (model.init_from=... takes just the weights).")
        for name, obj in self.objects.items():
            obj.load_state_dict(state[name])


def weights_and_optimizer(model: nn.Module, optimizer: Any, sharded: bool) -> dict[str, Stateful]:
    """The registry's ``model`` and ``optimizer`` entries: whole tensors with plain keys, or (``sharded``, for
    torch.distributed.checkpoint) each rank's shards keyed by parameter name."""
    if sharded:
        return {"model": ModelShards(model), "optimizer": OptimizerShards(model, optimizer)}
    return {"model": ModelState(model), "optimizer": optimizer}

"""Optimizer and learning-rate schedule from the config (``optim.*``, ``sched.*``).

Tasks get these by default; a task that wants its own overrides ``Task.build_optimizer`` or
``Task.build_scheduler``. Every schedule is stepped once per optimizer step and saved in checkpoints.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from launcher.config import ConfigError
from trainers.core.config import OptimConfig, SchedConfig

# Modules whose weights are scales and shifts, not features: decaying them towards zero only hurts.
_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                                             nn.LocalResponseNorm)
_RMS_NORM = getattr(nn, "RMSNorm", None)
if _RMS_NORM is not None:
    _NORM_TYPES = (*_NORM_TYPES, _RMS_NORM)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: with weight decay, and without (biases, norm layers)."""
    no_decay_ids: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, _NORM_TYPES) or name.endswith("bias") or p.ndim <= 1:
                no_decay_ids.add(id(p))
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if id(p) not in no_decay_ids]
    no_decay = [p for p in trainable if id(p) in no_decay_ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def separate_group(optimizer: torch.optim.Optimizer, param: torch.Tensor, like: dict[str, Any]) -> None:
    """Move ``param`` out of its group into a new last group with the settings of group ``like`` (e.g. to
    give it a schedule of its own); call before the optimizer has stepped."""
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            group["params"] = [p for p in group["params"] if p is not param]
            optimizer.add_param_group({**{k: v for k, v in like.items() if k != "params"}, "params": [param]})
            return
    raise ValueError("separate_group: the parameter is not in any group of the optimizer")


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """``optim.name`` over the model's trainable parameters, no decay on norm weights and biases."""
    groups = param_groups(model, cfg.weight_decay)
    if not any(g["params"] for g in groups):
        raise ConfigError("The model has no trainable parameters (model.freeze froze them all?); freeze fewer "
                          "prefixes.")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    optimizer = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return optimizer(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)  # type: ignore[arg-type]


def _warmup(warmup_steps: int, after: Callable[[int], float]) -> Callable[[int], float]:
    """Linear warm-up to the peak over ``warmup_steps``, then ``after(steps since the warm-up)``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return after(step - warmup_steps)

    return factor


def triangle(step: int, start: float, peak_step: int, total_steps: int, end: float) -> float:
    """Linear from ``start`` up to 1 at ``peak_step``, then linear down to ``end`` at ``total_steps``."""
    if step < peak_step:
        return start + (1 - start) * step / peak_step
    return 1 + (end - 1) * min(1.0, (step - peak_step) / max(1, total_steps - peak_step))


def lr_factor(cfg: SchedConfig, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at each optimizer step, for cosine, step, triangle and constant."""
    warmup = min(total_steps, max(1, round(cfg.warmup_epochs * steps_per_epoch))) if cfg.warmup_epochs else 0
    decay_steps = max(1, total_steps - warmup)
    if cfg.name == "triangle":  # its own rise, from initial_lr (not from ~0)
        return lambda step: triangle(step, cfg.initial_lr, warmup, total_steps, cfg.final_lr)
    if cfg.name == "cosine":
        def shape(t: int) -> float:
            progress = min(1.0, t / decay_steps)
            return cfg.final_lr + (1 - cfg.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.name == "step":
        every = max(1, round(cfg.step_epochs * steps_per_epoch))

        def shape(t: int) -> float:
            return cfg.gamma ** ((t + warmup) // every)
    else:
        def shape(t: int) -> float:
            return 1.0
    return _warmup(warmup, shape)


def build_scheduler(cfg: SchedConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    total_steps: int) -> LRScheduler:
    """``sched.name`` with warm-up; ``onecycle`` is torch's OneCycleLR with the warm-up as its rising phase."""
    if cfg.name == "onecycle":
        rise = cfg.warmup_epochs * steps_per_epoch / max(1, total_steps)
        if not 0 < rise < 1:
            raise ConfigError(f"sched.name=onecycle needs a rising phase inside the run: sched.warmup_epochs="
                              f"{cfg.warmup_epochs:g} is {rise:.0%} of the {total_steps} steps; set it between 0 and "
                              "the number of epochs (e.g. 30% of them).")
        peaks = [group["lr"] for group in optimizer.param_groups]
        # OneCycle also cycles momentum (or Adam's beta1) inversely to the learning rate, where there is one.
        cycle = "betas" in optimizer.defaults or optimizer.defaults.get("momentum", 0) > 0
        return OneCycleLR(optimizer, max_lr=peaks, total_steps=max(2, total_steps), pct_start=rise,
                          cycle_momentum=cycle)
    return LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch, total_steps))


class ConfiguredHyperparameters:
    """The optimizer's and the schedule's hyperparameters as this run's config built them.

    Loading a checkpoint brings back the values it was written with (``Optimizer.load_state_dict`` replaces each
    group's lr, weight_decay, betas, ...; the schedule's state replaces its base learning rates), so a changed
    ``optim.lr`` on resume would silently do nothing. ``reapply`` puts the configured values back where they
    differ, and the schedule continues at the resumed step from the new values: the toolkit's schedules (LambdaLR,
    OneCycleLR) are recomputed at that step; a task's own schedule, which may depend on its past, has its current
    lr scaled by the new base lr over the old. When nothing changed it touches nothing, so a resume with the same
    config stays bit-identical.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        self.optimizer, self.scheduler = optimizer, scheduler
        # Keys the schedule itself moves at every step are not settings: the current lr, and the momentum (or beta1)
        # of a schedule that cycles it.
        cycled = {"momentum", "betas"} if getattr(scheduler, "cycle_momentum", False) else set()
        self.moving = {"params", "lr"} | cycled
        self.groups = [self._settings(group) for group in optimizer.param_groups]

    def _settings(self, group: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in group.items() if k not in self.moving}

    def changed(self) -> list[str]:
        """The keys whose configured values differ from the optimizer's and schedule's current ones."""
        keys = {k for group, fresh in zip(self.optimizer.param_groups, self.groups)
                for k, v in fresh.items() if not _same(group.get(k), v)}
        return sorted({"lr" if k == "initial_lr" else k for k in keys})  # a schedule's base lr is the lr set

    def reapply(self) -> list[str]:
        """After loading a checkpoint: the configured values where they differ, and the schedule's learning rate
        (and cycled momentum) at its current step recomputed from them. Returns the keys that changed."""
        keys = self.changed()
        if not keys:
            return []
        groups = self.optimizer.param_groups
        loaded_initial = [group.get("initial_lr") for group in groups]
        for group, fresh in zip(groups, self.groups):
            group.update(fresh)
        if hasattr(self.scheduler, "base_lrs") and all("initial_lr" in g for g in groups):
            self.scheduler.base_lrs = [g["initial_lr"] for g in groups]  # as LRScheduler derives them
        if isinstance(self.scheduler, (LambdaLR, OneCycleLR)):  # the toolkit's schedules: a function of the step
            with warnings.catch_warnings():  # get_lr outside step() warns; here it is the point: the lr at this step
                warnings.simplefilter("ignore", UserWarning)
                lrs = self.scheduler.get_lr()
        else:  # a task's own schedule may depend on its past (chainable): scale by new base / old base
            lrs = [g["lr"] * g["initial_lr"] / old if old and g.get("initial_lr") else g["lr"]
                   for g, old in zip(groups, loaded_initial)]
        for group, lr in zip(groups, lrs):
            group["lr"] = lr
        if hasattr(self.scheduler, "_last_lr"):
            self.scheduler._last_lr = list(lrs)  # what get_last_lr() and the logs report
        return keys

    def reapplied(self) -> str:
        """``reapply()`` said as a sentence for the resume line ("" when nothing changed)."""
        keys = self.reapply()
        return f" The config's optimizer settings replace the checkpoint's ({', '.join(keys)})." if keys else ""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)

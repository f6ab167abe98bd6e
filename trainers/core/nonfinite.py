"""A loss that turns NaN or infinite: notice it without a host sync per step, stop every rank at the same step,
and never save the weights it produced (``train.nonfinite=stop``); or drop such steps as GradScaler does, up
to ``train.nonfinite_skips`` in a row (``train.nonfinite=skip``).

Where ``stop`` looks: at the stop agreement (about every 0.2 s of training, where ranks already agree), at
every log line (the logged mean is the same on every rank), at every epoch's end, and before every save.
``skip`` checks the gradients of every step after they are reduced (the same on every rank), which costs
one host sync per step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn

from trainers.core.amp import Amp

__all__ = ["DIVERGED_EXIT_CODE", "Diverged", "NonFinite", "finite_tensors"]

#: Exit status of a run that stopped because its loss or weights became NaN or infinite.
DIVERGED_EXIT_CODE = 4


class Diverged(Exception):
    """Training produced a non-finite loss or weights; nothing was saved from them."""

    same_on_every_rank = True  # every rank stops at the same step with the same message: rank 0 reports it
    raised_by_every_rank = True

    def __init__(self, what: str, step: int, last_good: Path | None) -> None:
        resume = (f"The last good checkpoint is {last_good}: lower optim.lr, clip gradients (train.grad_clip) or "
                  "skip such steps (train.nonfinite=skip), then run the same command again to resume from it"
                  if last_good is not None else
                  "No checkpoint was written before it: lower optim.lr or clip gradients (train.grad_clip), or "
                  "skip such steps (train.nonfinite=skip), and start again")
        super().__init__(f"Training diverged: {what} (noticed at step {step}); every rank stopped there and nothing "
                         f"was saved from the non-finite state. {resume}.")
        self.step = step


def finite_tensors(tensors: Iterable[torch.Tensor]) -> bool:
    """True when every element of every tensor is finite (one host sync)."""
    flags = [t.detach().isfinite().all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all().item()) if flags else True


class NonFinite:
    """The policy of ``train.nonfinite`` for one rank: which optimizer steps to take, and when to stop."""

    def __init__(self, mode: str, max_skips: int, log: Callable[[str], None],
                 last_good: Callable[[], Path | None]) -> None:
        self.mode, self.max_skips, self.log, self.last_good = mode, max_skips, log, last_good
        self.in_a_row = 0  # skip mode: steps dropped in a row

    def buffers_before(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Skip mode: a copy of the model's floating-point buffers (BatchNorm statistics), taken before the forward
        pass of a step, so that a dropped step leaves no trace in them either."""
        if self.mode != "skip":
            return None
        return [(b, b.detach().clone()) for b in model.buffers() if b.is_floating_point()]

    def optimizer_step(self, amp: Amp, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor],
                       max_norm: float, step: int,
                       buffers: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> bool:
        """The optimizer step (``amp.step``), unless skip mode drops it; True when the weights moved.

        Skip mode judges the reduced gradients, the same on every rank, so every rank drops the same steps; under
        fp16 the GradScaler's own decision (it skips inf/NaN gradients and lowers its scale) is the one counted.
        A dropped step also puts back ``buffers`` (from ``buffers_before``)."""
        if self.mode != "skip":
            amp.step(optimizer, params, max_norm)
            return True
        params = list(params)
        if amp.scaler is not None:
            scale = amp.scaler.get_scale()
            amp.step(optimizer, params, max_norm)
            skipped = amp.scaler.get_scale() < scale
        else:
            skipped = not finite_tensors(p.grad for p in params if p.grad is not None)
            if not skipped:
                amp.step(optimizer, params, max_norm)
        if skipped:
            with torch.no_grad():
                for live, saved in buffers or []:
                    live.copy_(saved)
        self._count(skipped, step)
        return not skipped

    def _count(self, skipped: bool, step: int) -> None:
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if not skipped:
            return
        if self.in_a_row >= self.max_skips:
            raise Diverged(f"{self.in_a_row} steps in a row had non-finite gradients (train.nonfinite_skips="
                           f"{self.max_skips})", step, self.last_good())
        self.log(f"step {step}: non-finite loss or gradients; step skipped ({self.in_a_row} in a row, at most "
                 f"{self.max_skips})")

    def check(self, finite: bool, step: int, what: str = "the training loss became NaN or infinite") -> None:
        """Stop when the state is not ``finite``: call it where every rank gives the same answer (an agreed flag,
        a reduced value), so that every rank stops at the same step."""
        if not finite:
            raise Diverged(what, step, self.last_good())

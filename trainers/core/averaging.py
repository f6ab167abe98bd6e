"""Weight averaging for a task's ``after_step`` hook: Lookahead (as in the airbench recipe). Its state is
checkpointed through ``Task.state()``, so that a resumed run averages exactly as an uninterrupted one."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["Lookahead", "LOOKAHEAD_EVERY"]

#: Lookahead: every this many steps the weights move to their running average.
LOOKAHEAD_EVERY = 5


class Lookahead:
    """Lookahead averaging (as in the airbench recipe): every LOOKAHEAD_EVERY steps the running average moves
    towards the weights by (1 - decay) and the weights are set to it; decay rises as 0.95^5 * (step/total)^3,
    and at the last step the weights become the average."""

    def __init__(self) -> None:
        self.average: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, model: nn.Module, step: int, total_steps: int) -> None:
        last = step >= total_steps
        due = last or step % LOOKAHEAD_EVERY == 0
        if self.average and not due:
            return  # most steps: nothing to do
        live = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        if not self.average:  # the first call starts the average from the weights it sees
            self.average = {k: v.detach().clone() for k, v in live.items()}
        if not due:
            return
        decay = 1.0 if last else 0.95 ** 5 * (step / total_steps) ** 3
        for k, v in live.items():
            self.average[k].lerp_(v, 1 - decay)
            v.copy_(self.average[k])

    def state_dict(self) -> dict[str, Any]:
        return {k: v.clone() for k, v in self.average.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average = {k: v.clone() for k, v in state.items()}

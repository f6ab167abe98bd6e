"""Exact distributed evaluation: every sample once, metrics as sums reduced in one collective."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from launcher.errors import UserError
from launcher.runtime import Runtime
from trainers.core.amp import Amp
from trainers.core.data import DeviceLoader, HostLoader, batch_len
from trainers.core.metrics import Metric
from trainers.core.sharding import is_sharded
from trainers.core.task import BatchInfo, Task

#: The epoch number that keys evaluation-time transforms: evaluation does not depend on when it runs.
EVAL_EPOCH = -1


@torch.no_grad()
def evaluate(model: nn.Module, loader: DeviceLoader | HostLoader, task: Task, metrics: dict[str, Metric],
             rt: Runtime, amp: Amp, seed: int, prepare: Callable[[Any], Any] = lambda b: b,
             max_batches: int | None = None) -> dict[str, Any]:
    """``test_<name>`` for every metric, and ``test_samples``, over this rank's shard and then all ranks.

    No collective runs per batch (shards differ in length by up to one batch); the sums of all
    metrics are all-reduced once at the end.
    """
    sizes = [m.size for m in metrics.values()]
    sums = torch.zeros(sum(sizes) + 1, dtype=torch.float64, device=rt.device)  # the last one counts samples
    views = list(sums[:-1].split(sizes))
    model.eval()
    batches = loader.epoch(seed, EVAL_EPOCH)
    try:
        for i, (batch, index, counted) in enumerate(_lockstep(batches, rt) if is_sharded(model) else
                                                    ((b, x, True) for b, x in batches)):
            if max_batches is not None and i >= max_batches:  # run.debug: a quick look, not a full pass
                break
            batch = prepare(task.transform(batch, BatchInfo(index, EVAL_EPOCH, seed, train=False)))
            with amp.autocast():
                outputs = task.forward(model, batch)
            if not counted:
                continue
            targets = task.targets(batch)
            for metric, view in zip(metrics.values(), views):
                metric.update(view, outputs, targets)
            sums[-1] += batch_len(batch)
    finally:
        model.train()
    rt.all_reduce(sums, "evaluation")
    results = {f"test_{name}": metric.compute(view) for (name, metric), view in zip(metrics.items(), views)}
    return {**results, "test_samples": int(sums[-1].item())}


def describe(results: dict[str, Any]) -> str:
    """One console line of scalar results, e.g. ``test_acc 0.9120  test_loss 0.3141``."""
    return "  ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float))


def _lockstep(batches: Iterator[tuple[Any, torch.Tensor]], rt: Runtime) -> Iterator[tuple[Any, torch.Tensor, bool]]:
    """A sharded model's forward is a collective (it gathers parameters), so every rank runs as many as the rank
    with the most batches: one flag all-reduced per batch, and a rank whose shard ended runs its last batch again,
    uncounted."""
    last = None
    while True:
        item = next(batches, None)
        if rt.max_all([float(item is not None)], "evaluation")[0] == 0:
            return
        if item is not None:
            last = item
        elif last is None:
            raise UserError(f"Rank {rt.rank} has no evaluation batch at all under dist.strategy=fsdp: the evaluation "
                            "set is smaller than the number of ranks. Use fewer ranks or a larger evaluation set.")
        batch, index = item if item is not None else last
        yield batch, index, item is not None

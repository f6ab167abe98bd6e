"""Evaluation metrics that are exact under any world size: sums over samples, all-reduced once.

A metric never averages per rank. It adds its sums (counts, loss sums, a confusion matrix) into a
float64 vector that the trainer owns; after the last batch the trainer all-reduces the vectors of
all metrics in one collective, and ``compute`` turns the global sums into the value. Because every
sample is evaluated exactly once (no padding), the result does not depend on the number of ranks.

    class MAE(Metric):
        size = 2                                     # sum of |error|, count
        def update(self, sums, outputs, targets):
            sums[0] += (outputs - targets).abs().sum()
            sums[1] += targets.numel()
        def compute(self, sums):
            return (sums[0] / sums[1]).item()
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from launcher.config import ConfigError

__all__ = ["Metric", "Accuracy", "MeanLoss", "ConfusionMatrix", "MeanIoU", "ranking_metric"]


class Metric:
    """A metric built from ``size`` sums; subclasses define ``update`` and ``compute``."""

    size: int = 1
    #: Direction for ranking checkpoints (``checkpoint.best_metric``); None: not a ranking metric.
    higher_is_better: bool | None = True

    def update(self, sums: torch.Tensor, outputs: Any, targets: Any) -> None:
        """Add this batch's contribution to ``sums`` (a float64 view of length ``size`` on the device)."""
        raise NotImplementedError

    def compute(self, sums: torch.Tensor) -> Any:
        """The metric's value from the global sums (a float, or any JSON-serialisable value)."""
        raise NotImplementedError


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a / b).item() if b.item() > 0 else float("nan")


class Accuracy(Metric):
    """Fraction of samples whose target is among the ``topk`` highest scores (top-1 by default)."""

    size = 2  # correct, count

    def __init__(self, topk: int = 1) -> None:
        self.topk = topk

    def update(self, sums: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        if self.topk == 1:
            correct = outputs.argmax(1) == targets
        else:
            correct = (outputs.topk(self.topk, dim=1).indices == targets[:, None]).any(1)
        sums[0] += correct.sum()
        sums[1] += targets.shape[0]

    def compute(self, sums: torch.Tensor) -> float:
        return _safe_div(sums[0], sums[1])


def _cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs.float(), targets, reduction="none")


class MeanLoss(Metric):
    """Mean of a per-sample loss over the whole set (default: cross-entropy without label smoothing)."""

    size = 2  # loss sum, count
    higher_is_better = False

    def __init__(self, per_sample: Callable[[Any, Any], torch.Tensor] = _cross_entropy) -> None:
        self.per_sample = per_sample

    def update(self, sums: torch.Tensor, outputs: Any, targets: Any) -> None:
        losses = self.per_sample(outputs, targets)
        sums[0] += losses.double().sum()
        sums[1] += losses.numel()

    def compute(self, sums: torch.Tensor) -> float:
        return _safe_div(sums[0], sums[1])


class ConfusionMatrix(Metric):
    """Counts of (target, prediction) pairs; ``compute`` gives the matrix as nested lists of ints.

    Works for classification (outputs ``(N, C)``) and dense prediction (outputs ``(N, C, ...)``,
    targets ``(N, ...)``); targets equal to ``ignore_index`` are not counted.
    """

    higher_is_better: bool | None = None

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.size = num_classes * num_classes

    def update(self, sums: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        pred = outputs.argmax(1).reshape(-1)
        target = targets.reshape(-1)
        keep = target != self.ignore_index if self.ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
        pairs = target[keep] * self.num_classes + pred[keep]
        sums += torch.bincount(pairs, minlength=self.size).to(sums.dtype)

    def matrix(self, sums: torch.Tensor) -> torch.Tensor:
        """Rows are targets, columns predictions."""
        return sums.view(self.num_classes, self.num_classes)

    def compute(self, sums: torch.Tensor) -> Any:
        return self.matrix(sums).long().tolist()


class MeanIoU(ConfusionMatrix):
    """Mean intersection-over-union over the classes that occur (in targets or predictions)."""

    higher_is_better = True

    def compute(self, sums: torch.Tensor) -> float:
        m = self.matrix(sums)
        inter = m.diagonal()
        union = m.sum(0) + m.sum(1) - inter
        present = union > 0
        return (inter[present] / union[present]).mean().item() if present.any() else float("nan")


def ranking_metric(metrics: dict[str, Metric], best_metric: str, keep_best: bool) -> tuple[str, float]:
    """The reported metric (``test_<name>``) that ranks checkpoints, and its sign (+1: higher is better).

    ``best_metric`` names it (empty: the first ranking metric); ConfigError if it is not one of ``metrics``."""
    ranking = {f"test_{n}": m.higher_is_better for n, m in metrics.items() if m.higher_is_better is not None}
    name = best_metric or next(iter(ranking), "")
    if name not in ranking and (keep_best or best_metric):
        raise ConfigError(f"checkpoint.best_metric={name or '(empty)'} is not one of this task's ranking metrics "
                          f"({', '.join(ranking) or 'none'}); set it to one of these, or checkpoint.keep_best=false.")
    return name, 1.0 if ranking.get(name, True) else -1.0

"""A complete task of your own: its Dataset (dict samples), model, loss, metric, AdamW and config keys.

    python examples/custom_task.py                                   # one process
    torchrun --standalone --nproc_per_node=2 examples/custom_task.py # 2 ranks (gloo on CPU, nccl on GPUs)
    python examples/custom_task.py data.noise=0.2 optim.lr=0.01 train.epochs=5

The toolkit adds the rest: sharding, DDP, exact evaluation, checkpoints, resume, preemption, logging.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from trainers.core.config import Config, DataConfig, OptimConfig, TrainConfig, redefault, setting
from trainers.core import MeanLoss, Metric, Task, run_task


@dataclass(frozen=True)
class WaveData(DataConfig):  # the task's own keys, validated where they are declared
    train_size: int = setting(2048, "training samples", gt=0)
    eval_size: int = setting(1001, "evaluation samples", gt=0)
    noise: float = setting(0.1, "std of the noise added to each training target", ge=0)
    num_workers: int = redefault(DataConfig, "num_workers", 0)  # tiny samples: the main process is fastest


@dataclass(frozen=True)
class WaveTrain(TrainConfig):  # new defaults for existing keys, with their documentation and checks
    epochs: int = redefault(TrainConfig, "epochs", 20)
    batch_size: int = redefault(TrainConfig, "batch_size", 128)


@dataclass(frozen=True)
class WaveOptim(OptimConfig):
    name: str = redefault(OptimConfig, "name", "adamw")
    lr: float = redefault(OptimConfig, "lr", 0.02)
    weight_decay: float = redefault(OptimConfig, "weight_decay", 1e-4)


@dataclass(frozen=True)
class WaveConfig(Config):
    data: WaveData = field(default_factory=WaveData)
    train: WaveTrain = field(default_factory=WaveTrain)
    optim: WaveOptim = field(default_factory=WaveOptim)


class Waves(Dataset):
    """Points of y = sin(3x) on [-2, 2] with noisy targets, as dicts {"x": (1,), "y": (1,)}."""

    def __init__(self, size: int, noise: float) -> None:
        self.size, self.noise = size, noise

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.tensor([-2.0 + 4.0 * i / (self.size - 1)])
        # Random per sample: the toolkit seeds each sample from (seed, epoch, index), so resume is exact.
        return {"x": x, "y": torch.sin(3 * x) + self.noise * torch.randn(1)}


class MeanAbsoluteError(Metric):
    """Exact under any number of ranks: sums here, all-reduced once by the trainer, divided at the end."""

    size = 2  # sum of |error|, count
    higher_is_better = False

    def update(self, sums: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        sums[0] += (outputs.double() - targets).abs().sum()
        sums[1] += targets.numel()

    def compute(self, sums: torch.Tensor) -> float:
        return (sums[0] / sums[1]).item()


def huber(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.smooth_l1_loss(outputs.float(), targets, beta=0.1, reduction="none")


class WaveTask(Task[WaveConfig]):
    name = "waves"
    config = WaveConfig

    def build_data(self, rt):  # (train, evaluation); rt says who this rank is, if that matters
        return Waves(self.cfg.data.train_size, self.cfg.data.noise), Waves(self.cfg.data.eval_size, 0.0)

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))

    # inputs(batch) / targets(batch) default to the "x" and "y" entries of a dict sample.
    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return huber(outputs, batch["y"]).mean()

    def metrics(self) -> dict[str, Metric]:  # the first one ranks checkpoints
        return {"mae": MeanAbsoluteError(), "loss": MeanLoss(huber)}

    # The optimizer and schedule come from optim.* and sched.* (AdamW by default here). For your own,
    # override build_optimizer(self, model) and build_scheduler(self, optimizer, steps_per_epoch, total_steps).


if __name__ == "__main__":
    sys.exit(run_task(WaveTask, prog="examples/custom_task.py"))

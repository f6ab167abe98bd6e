"""The shared machinery every task uses: the loop, data order and loaders, precision, parallel
wrapping, checkpoints, metrics and outputs. A task imports what it needs from here:

    from trainers.core import Task, TensorSplit, run_task
"""

from trainers.core.data import TensorSplit
from trainers.core.entry import run_task
from trainers.core.metrics import Accuracy, ConfusionMatrix, MeanIoU, MeanLoss, Metric
from trainers.core.task import BatchInfo, Task
from trainers.core.trainer import Trainer

__all__ = ["Task", "BatchInfo", "TensorSplit", "run_task", "Trainer", "Metric", "Accuracy", "MeanLoss",
           "ConfusionMatrix", "MeanIoU"]

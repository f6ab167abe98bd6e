"""The training sections every task shares: data loading, model preparation, training, optimizer, schedule,
evaluation, checkpoints and the run itself, plus the launcher's ``dist`` and ``slurm`` sections.

A task extends them by subclassing sections and the root, so it adds keys without touching this module::

    @dataclass(frozen=True)
    class MyData(DataConfig):
        root: str = setting("data", "folder of the dataset")

    @dataclass(frozen=True)
    class MyConfig(Config):
        data: MyData = field(default_factory=MyData)

Light on purpose (no torch): ``--help`` and config errors are answered before torch is imported. The
engine (loading, overrides, validation, the fingerprint) is ``launcher.config``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
import math
from pathlib import Path
from typing import Any, ClassVar

from launcher.config import ConfigError, DistConfig, SlurmConfig, redefault, setting

__all__ = ["Precision", "DataConfig", "ModelConfig", "TrainConfig", "OptimConfig", "SchedConfig", "EvalConfig",
           "CheckpointConfig", "RunConfig", "Config", "DistConfig", "SlurmConfig", "ConfigError", "setting",
           "redefault", "MissingKey", "micro_batch_size"]


def _existing_checkpoint(value: str) -> str | None:
    if value in ("auto", "never") or Path(value).exists():
        return None
    return "is neither 'auto', 'never' nor an existing checkpoint file; give one of these"


def _bool_or_auto(value: bool | str) -> str | None:
    return None if isinstance(value, bool) or value == "auto" else f"is '{value}'; give true, false or auto"


def _betas(value: tuple[float, float]) -> str | None:
    bad = [b for b in value if not 0 <= b < 1]  # written so that NaN is bad too
    return f"is {list(value)}; each beta must be in [0, 1), e.g. [0.9,0.999]" if bad else None


def _existing_file_or_empty(value: str) -> str | None:
    return None if not value or Path(value).is_file() else "is not an existing file; give the path of a model.pt, " \
        "a checkpoint or a state_dict file (or leave it empty)"


class Precision(str, Enum):
    """Numeric precision of the forward and backward passes."""

    auto = "auto"  # bf16 (fp16 where the GPU lacks bf16) on CUDA, fp32 on the CPU
    fp32 = "fp32"
    bf16 = "bf16"  # autocast to bfloat16; no loss scaling needed
    fp16 = "fp16"  # autocast to float16 with a GradScaler


class MissingKey(ConfigError, AttributeError):
    """A task read a key that its config schema does not declare."""


class _Keys:
    """Base of the config sections: reading a key the schema does not declare says how to declare it (a task
    that forgot ``config = ...`` would otherwise fail with a bare AttributeError deep inside its own code)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # Python's and OmegaConf's own probes
            raise AttributeError(name)
        kind = type(self)
        section = next((s for base, s in _SECTIONS.items() if issubclass(kind, base)), "")
        known = ", ".join(f.name for f in dataclasses.fields(self))  # type: ignore[arg-type]
        raise MissingKey(
            f"The task reads '{f'{section}.' if section else ''}{name}', which its config does not declare "
            f"({kind.__name__} has {known}). Declare the key in a config section of the task and name that config "
            "on the Task class with `config = YourConfig`; a task without it has the common keys only.")


@dataclass(frozen=True)
class DataConfig(_Keys):
    """How batches are loaded; a task adds where its data lives."""

    loader: str = setting("dataloader", "`dataloader` (torch DataLoader, any Dataset) or `device` (in-memory "
                          "tensor splits resident on the device; same batches)", choices=("dataloader", "device"), changes_run=False)
    num_workers: int = setting(2, "DataLoader worker processes per rank (0: load in the main process)", ge=0, changes_run=False)
    pin_memory: bool = setting(True, "page-locked host batches for faster copies to a GPU (ignored on CPU)", changes_run=False)
    persistent_workers: bool = setting(True, "keep DataLoader workers alive between epochs", changes_run=False)
    prefetch_factor: int = setting(2, "batches each worker loads ahead", gt=0, changes_run=False)


@dataclass(frozen=True)
class ModelConfig(_Keys):
    """How the task's model is prepared; a task adds which model to build."""

    sync_bn: bool = setting(False, "BatchNorm statistics over the global batch (torch SyncBatchNorm on GPUs, a "
                            "gloo implementation on CPU)")
    channels_last: bool | str = setting("auto", "NHWC memory format for the model and 4-D inputs: `auto` (on with "
                                        "CUDA, and on a CPU whose convolutions run in oneDNN: faster on both), "
                                        "`true` or `false`", check=_bool_or_auto)
    compile: bool | str = setting("auto", "torch.compile the training model: `auto` (on with CUDA and Triton "
                                  "unless run.debug; off on the CPU, where compiling costs more than it saves), "
                                  "`true` or `false`", check=_bool_or_auto)
    init_from: str = setting("", "start from these weights: a `model.pt`, a checkpoint of this toolkit or a plain "
                             "state_dict; matching keys load, the rest is reported", check=_existing_file_or_empty)
    freeze: str = setting("", "comma-separated parameter name prefixes to freeze, e.g. `conv1,layer1`")
    shard_units: str = setting("", "`dist.strategy=fsdp`: the modules sharded one by one, comma-separated dotted "
                               "paths (e.g. `layer1,layer2`); empty: each block of a transformer's `blocks`, else "
                               "the model's top-level parts", changes_run=False)
    activation_checkpointing: bool = setting(False, "`dist.strategy=fsdp`: recompute each shard unit's activations "
                                             "in the backward pass instead of keeping them (less memory, ~1/3 "
                                             "more compute)", changes_run=False)
    cpu_offload: bool = setting(False, "`dist.strategy=fsdp` on GPUs: keep the parameter, gradient and optimizer "
                                "shards in host memory (FSDP2's CPUOffloadPolicy; the optimizer steps on the CPU)",
                                changes_run=False)


@dataclass(frozen=True)
class TrainConfig(_Keys):
    epochs: int = setting(30, "epochs", gt=0)
    batch_size: int = setting(512, "**global** batch: samples per optimizer step over all ranks; each rank gets "
                              "`batch_size / world_size`", gt=0)
    precision: Precision = setting(Precision.auto, "`auto` (bf16 on CUDA, fp16 on GPUs without bf16, fp32 on the "
                                   "CPU: exact and resumable bit for bit), `fp32`, `bf16` (autocast, no scaler; on "
                                   "a CPU with native bf16 about 2x faster) or `fp16` (autocast + GradScaler)")
    grad_accum: int = setting(1, "micro-steps per optimizer step; DDP syncs gradients only on the last", gt=0)
    grad_clip: float = setting(0.0, "max global gradient norm (unscaled first under fp16); 0 disables", ge=0)
    max_steps: int = setting(0, "stop after this many optimizer steps (0: all epochs)", ge=0)
    label_smoothing: float = setting(0.0, "label smoothing of the default cross-entropy loss", ge=0, le=1)
    nonfinite: str = setting("stop", "a NaN or infinite loss: `stop` (every rank stops at the same step, exit 4, "
                             "nothing saved from the bad state) or `skip` (drop steps whose gradients are not "
                             "finite, as GradScaler does; one host sync per step)", choices=("stop", "skip"),
                             changes_run=False)
    nonfinite_skips: int = setting(10, "`train.nonfinite=skip`: steps dropped in a row after which the run stops "
                                   "as with `stop`", gt=0, changes_run=False)


@dataclass(frozen=True)
class OptimConfig(_Keys):
    name: str = setting("sgd", "`sgd` (momentum, Nesterov), `adamw` or `adam`", choices=("sgd", "adamw", "adam"))
    lr: float = setting(0.1, "peak learning rate", ge=0)
    momentum: float = setting(0.9, "SGD momentum", ge=0)
    nesterov: bool = setting(True, "Nesterov momentum (SGD)")
    betas: tuple[float, float] = setting((0.9, 0.999), "Adam/AdamW betas, e.g. `[0.9,0.95]`", check=_betas)
    eps: float = setting(1e-8, "Adam/AdamW epsilon", gt=0)
    weight_decay: float = setting(5e-4, "weight decay; never applied to norm-layer weights and biases", ge=0)


@dataclass(frozen=True)
class SchedConfig(_Keys):
    name: str = setting("cosine", "`cosine` (to `final_lr`), `onecycle` (torch OneCycleLR), `step` (x`gamma` every "
                        "`step_epochs`), `triangle` (linear from `initial_lr` up to the peak at `warmup_epochs`, "
                        "linear down to `final_lr`) or `constant`",
                        choices=("cosine", "onecycle", "step", "triangle", "constant"))
    initial_lr: float = setting(0.0, "`triangle`: learning rate at the first step, as a fraction of the peak", ge=0)
    warmup_epochs: float = setting(1.0, "linear warm-up from ~0 to the peak (for `onecycle`: its rising phase)", ge=0)
    final_lr: float = setting(0.0, "`cosine`: learning rate at the end, as a fraction of the peak", ge=0)
    step_epochs: float = setting(30.0, "`step`: epochs between decays", gt=0)
    gamma: float = setting(0.1, "`step`: decay factor", gt=0)


@dataclass(frozen=True)
class EvalConfig(_Keys):
    batch_size: int = setting(1024, "global evaluation batch", gt=0, changes_run=False)
    every_epochs: int = setting(1, "evaluate every N epochs (and always after the last)", gt=0, changes_run=False)


@dataclass(frozen=True)
class CheckpointConfig(_Keys):
    every_epochs: int = setting(1, "save at the end of every N epochs (0: never)", ge=0, changes_run=False)
    every_steps: int = setting(0, "also save every N optimizer steps (0: never)", ge=0, changes_run=False)
    every_minutes: float = setting(0.0, "also save once this many minutes have passed since the last checkpoint (0: "
                                   "never); all ranks agree on the step", ge=0, changes_run=False)
    keep_last: int = setting(3, "newest checkpoints kept on disk", gt=0, changes_run=False)
    keep_best: bool = setting(True, "also keep the checkpoint with the best `best_metric`", changes_run=False)
    best_metric: str = setting("", "evaluation metric that ranks checkpoints, e.g. `test_acc` (empty: the task's "
                               "first metric)", changes_run=False)
    resume: str = setting("auto", "`auto` (newest valid checkpoint in `run.dir`), `never`, or a checkpoint path",
                          check=_existing_checkpoint, changes_run=False)
    async_: bool = setting(False, "write checkpoints in a background thread: training waits only for a copy of the "
                           "state in host memory (same atomic files; the stop checkpoint is always waited for)",
                           changes_run=False)


@dataclass(frozen=True)
class RunConfig(_Keys):
    dir: str = setting("", "run directory; empty: `runs/<name>-<fingerprint>`, a hash of the keys that change "
                       "the run, so that re-running a command resumes it", changes_run=False)
    name: str = setting("", "name used for the default run directory (empty: the task's name)", changes_run=False)
    seed: int = setting(0, "seed of the model initialisation, the sample order and random transforms", ge=0)
    deterministic: bool = setting(False, "deterministic kernels (slower; with fp32 on CPU, resume is bit-exact)")
    log_every: int = setting(50, "optimizer steps between training-loss lines", gt=0, changes_run=False)
    progress: str = setting("auto", "`auto` (a bar on a terminal, plain lines otherwise), `bar`, `lines`, `quiet`",
                            choices=("auto", "bar", "lines", "quiet"), changes_run=False)
    tensorboard: bool = setting(False, "also write TensorBoard event files into the run directory (needs the "
                                "`tensorboard` package: pip install -e '.[tensorboard]')", changes_run=False)
    debug: bool = setting(False, "one process, a few batches per epoch, data loaded in the main process (pdb "
                          "works), anomaly detection, deterministic kernels, full tracebacks, a model summary")


@dataclass(frozen=True)
class Config(_Keys):
    """The sections every task has; a task subclasses sections and this root to add its own keys."""

    #: Keys that moved; using the old name is an error that names the new one.
    renamed: ClassVar[dict[str, str]] = {
        "train.lr": "optim.lr",
        "train.momentum": "optim.momentum",
        "train.weight_decay": "optim.weight_decay",
        "train.warmup_epochs": "sched.warmup_epochs",
    }

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def check(self) -> None:
        """Rules that span several keys; a task's config overrides this and raises ConfigError."""


#: The key prefix of each section class (and of its subclasses), for messages.
_SECTIONS: dict[type, str] = {DataConfig: "data", ModelConfig: "model", TrainConfig: "train", OptimConfig: "optim",
                              SchedConfig: "sched", EvalConfig: "eval", CheckpointConfig: "checkpoint", RunConfig: "run"}


def micro_batch_size(global_batch: int, world_size: int, grad_accum: int = 1) -> int:
    """Samples in one micro-batch of one rank (the global batch over ranks and accumulation steps); a
    ConfigError naming workable values when the global batch does not divide."""
    parts = world_size * grad_accum
    if global_batch % parts:
        lower, upper = global_batch // parts * parts, math.ceil(global_batch / parts) * parts
        raise ConfigError(
            f"train.batch_size={global_batch} (the global batch) does not divide into {world_size} ranks x "
            f"{grad_accum} accumulation steps; set train.batch_size to a multiple of {parts} "
            f"(e.g. {lower or parts} or {upper}) or change the number of ranks or train.grad_accum.")
    return global_batch // parts

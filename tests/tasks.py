"""Small tasks and rank functions shared by the distributed tests (importable by spawned ranks)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn

from launcher.config import load_config
from launcher.runtime import distributed
from trainers.cifar import CifarConfig, CifarTask
from trainers.core.parallel import unwrap
from trainers.core.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = REPO / "configs" / "cifar_debug.yaml"
#: lm_debug.yaml on a smaller corpus and model, at the learning rate the LM and FSDP tests' tolerances were set for
#: (lm_debug.yaml's own is 6e-3).
LM_SMALL = ["data.synthetic_bytes=20000", "data.seq_len=32", "model.width=32", "train.batch_size=16", "optim.lr=3e-3"]


class NoNormTask(CifarTask):
    """CIFAR (synthetic) with a CNN without BatchNorm: its gradient does not depend on how a batch is split."""

    def build_model(self) -> nn.Module:
        w = self.cfg.model.width
        return nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4),
                             nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(w, 10))


def load_example(name: str = "custom_task") -> ModuleType:
    """A file under examples/ (not a package) as a module, importable again by spawned ranks."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def task_class(name: str) -> Any:
    if name == "waves":
        return load_example().WaveTask
    if name == "lm":
        from trainers.lm import LMTask

        return LMTask
    return {"cifar": CifarTask, "nonorm": NoNormTask}[name]


def flat_params(model: nn.Module) -> torch.Tensor:
    """Every parameter whole (a sharded one is gathered: a collective), flattened into one tensor."""
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return torch.cat([p.detach().reshape(-1).clone() for p in full])


class TracingTrainer(Trainer):
    """Records the flattened parameters after every optimizer step."""

    trace: list[torch.Tensor]

    def _after_step(self) -> None:
        super()._after_step()
        self.trace = getattr(self, "trace", [])
        self.trace.append(flat_params(unwrap(self.model)))


def debug_config(overrides: list[str]) -> CifarConfig:
    return load_config(DEBUG_CONFIG, ["run.progress=quiet", "checkpoint.resume=never", *overrides], schema=CifarConfig)


def task_config(task: str, overrides: list[str]) -> Any:
    """The debug config for CIFAR tasks; the task's own defaults for the others."""
    if task in ("cifar", "nonorm"):
        return debug_config(overrides)
    if task == "lm":
        return load_config(REPO / "configs" / "lm_debug.yaml", ["run.progress=quiet", "checkpoint.resume=never",
                                                                *overrides], schema=task_class(task).config)
    return load_config(None, ["run.progress=quiet", "checkpoint.resume=never", *overrides],
                       schema=task_class(task).config)


def train_trace(task: str, overrides: list[str], run_dir: str) -> list[torch.Tensor]:
    """Rank function: train with the debug config and return the per-step parameter trace."""
    torch.set_num_threads(1)
    cfg = task_config(task, [f"run.dir={run_dir}", *overrides])
    with distributed(cfg.dist) as rt:
        if rt.is_main:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
        rt.barrier("test set-up")
        trainer = TracingTrainer(task_class(task)(cfg), rt, Path(run_dir))
        trainer.fit()
        return trainer.trace


def evaluate_initial(overrides: list[str], run_dir: str, task: str = "cifar") -> dict[str, Any]:
    """Rank function: exact evaluation of the freshly initialised model."""
    torch.set_num_threads(1)
    cfg = task_config(task, [f"run.dir={run_dir}", *overrides])
    with distributed(cfg.dist) as rt:
        trainer = Trainer(task_class(task)(cfg), rt, Path(run_dir))
        result = trainer.evaluate()
        trainer.sink.close()
        return {**result, "rank": rt.rank, "world": int(os.environ["WORLD_SIZE"])}


def shard_bytes(task: str, overrides: list[str], run_dir: str) -> dict[str, int]:
    """Rank function: the bytes this rank holds in parameters, gradients and optimizer state after one step (its
    local shards under FSDP)."""
    from trainers.core.sharding import local
    from trainers.core.task import BatchInfo

    torch.set_num_threads(1)
    cfg = task_config(task, [f"run.dir={run_dir}", *overrides])
    with distributed(cfg.dist) as rt:
        trainer = Trainer(task_class(task)(cfg), rt, Path(run_dir))
        batch, index = next(iter(trainer.train_loader.epoch(cfg.run.seed, 0)))
        batch = trainer.prepare_batch(batch, BatchInfo(index, 0, cfg.run.seed, train=True))
        trainer.task.loss(trainer.task.forward(trainer.model, batch), batch).backward()
        trainer.optimizer.step()
        params = list(trainer.model.parameters())
        size = {"parameters": sum(local(p).nbytes for p in params),
                "gradients": sum(local(p.grad).nbytes for p in params if p.grad is not None),
                "optimizer": sum(local(t).nbytes for s in trainer.optimizer.state.values() for t in s.values()
                                 if isinstance(t, torch.Tensor) and t.dim() > 0)}
        trainer.sink.close()
        return {**size, "total": sum(size.values())}


def runtime_identity() -> dict[str, Any]:
    """Rank function: who the runtime thinks this process is."""
    cfg = debug_config([])
    with distributed(cfg.dist) as rt:
        return {"rank": rt.rank, "world": rt.world_size, "backend": rt.backend, "device": str(rt.device),
                "max": rt.max_all([float(rt.rank == 1), -rt.rank], "test"), "gathered": rt.gather_objects(rt.rank * 10, "test")}


def evaluate_checkpoint(checkpoint: str, run_dir: str) -> dict[str, Any]:
    """Rank function: load ``checkpoint`` (explicit path) and evaluate it exactly."""
    torch.set_num_threads(1)
    cfg = load_config(DEBUG_CONFIG, ["run.progress=quiet", f"run.dir={run_dir}", f"checkpoint.resume={checkpoint}"],
                      schema=CifarConfig)
    with distributed(cfg.dist) as rt:
        trainer = Trainer(CifarTask(cfg), rt, Path(run_dir))
        trainer.resume()
        result = trainer.evaluate()
        trainer.sink.close()
        return result


def workers_alive_after_fit(overrides: list[str], run_dir: str) -> int:
    """DataLoader worker processes of this rank still alive once ``Trainer.fit()`` has returned."""
    import multiprocessing

    # run_ranks' ranks are daemonic (a stuck one dies with the test), and daemonic processes may not start workers
    multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]
    cfg = load_config(DEBUG_CONFIG, [f"run.dir={run_dir}", "run.progress=quiet", *overrides], schema=CifarConfig)
    with distributed(cfg.dist) as rt:
        Trainer(CifarTask(cfg), rt, Path(run_dir)).fit()
        return len(multiprocessing.active_children())

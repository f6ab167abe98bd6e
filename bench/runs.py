"""Training-loop measurements shared by the benchmarks: the real Trainer on 1 or 2 gloo ranks, timed over
one epoch after a warm-up epoch, in fresh processes so that each setting starts from the same state."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]

#: What the ranks' fork server imports once (see rank_context). torch's optimizers import torch._dynamo when the first
#: one is built (about 2 s of CPU here), so every rank would.
PRELOAD = ["torch", "torch._dynamo", "launcher.runtime", "trainers.core.trainer", "trainers.cifar", "trainers.lm"]


def rank_context() -> Any:
    """Where benchmark ranks come from: a fork server that imported torch and the trainers once, so that each setting's
    ranks start in a fraction of a second instead of importing torch again (~3 s a process on this CPU). The server
    has run no torch operation and joined no process group, so every setting still starts from the same state."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


#: A tiny model on tiny batches: hundreds of steps per second, so that per-step costs show.
FAST_STEPS = ["model.width=2", "train.batch_size=8", "data.synthetic_train_size=4096", "data.synthetic_test_size=10",
              "eval.batch_size=10", "data.loader=device", "train.epochs=10"]
#: The width of the debug model in the rows that train it (data parallel, checkpoints): the size their figures were
#: specified and quoted at. configs/cifar_debug.yaml itself trains at 16, since the tests run it hundreds of times.
DEBUG_WIDTH = "model.width=32"
#: The debug recipe's model and batch (configs/cifar_debug.yaml) at DEBUG_WIDTH: a few tens of steps per second.
DEBUG_STEPS = ["data.loader=device", "train.epochs=10", "data.synthetic_train_size=4096", DEBUG_WIDTH]


def _rank(rank: int, world: int, port: int, threads: int, overrides: list[str], mode: str, out: Any) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(threads)
    from launcher.config import load_config
    from launcher.runtime import distributed
    from trainers.cifar import CifarConfig, CifarTask
    from trainers.core import trainer as loop

    with tempfile.TemporaryDirectory() as run_dir:
        logging = ["run.progress=quiet", "run.log_every=1000000"]
        if mode == "logging-on":  # the defaults: a line and a metrics record every 50 steps, into a log file
            logging = ["run.progress=lines"]
            os.dup2(os.open(os.path.join(run_dir, "stdout.log"), os.O_WRONLY | os.O_CREAT), 1)
        cfg = load_config(REPO / "configs" / "cifar_debug.yaml", [
            f"run.dir={run_dir}", "checkpoint.every_epochs=0", "checkpoint.resume=never", "run.log_every=50",
            *logging, *overrides], schema=CifarConfig)
        with distributed(cfg.dist) as rt:
            trainer = loop.Trainer(CifarTask(cfg), rt, Path(run_dir))
            if mode == "stop-every-step":  # the agreement at every step, as before it was amortized
                trainer.agreement.interval_s, trainer.agreement.max_steps = 0.0, 1
            elif mode == "no-stop-check":  # never agree (a run that could not be stopped cleanly)
                trainer.agreement.every = trainer.agreement.max_steps = 10**12
            trainer.sink.start(trainer.total_steps, 0)
            trainer.train_epoch(0)  # warm-up: allocations, first-step costs
            trainer.state.epoch, trainer.state.step_in_epoch = 1, 0  # as the end of an epoch leaves it
            start = time.perf_counter()
            trainer.train_epoch(1)
            seconds = time.perf_counter() - start
            trainer.sink.stop()
            trainer.sink.close()
    if rank == 0:
        out.put(trainer.steps_per_epoch * cfg.train.batch_size / seconds)


def samples_per_second(world: int, threads: int, overrides: list[str], mode: str = "") -> float:
    """Global samples/s of one training epoch of the debug task on ``world`` gloo ranks."""
    ctx = rank_context()
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, world, port, threads, overrides, mode, out)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        return float(out.get(timeout=900))
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()


def _stop_check_rank(rank: int, port: int, epochs: int, overrides: list[str], out: Any) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from launcher.config import load_config
    from launcher.runtime import distributed
    from trainers.cifar import CifarConfig, CifarTask
    from trainers.core import trainer as loop

    rates: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(REPO / "configs" / "cifar_debug.yaml", [
            f"run.dir={run_dir}", "checkpoint.every_epochs=0", "checkpoint.resume=never", "run.progress=quiet",
            "run.log_every=1000000", *FAST_STEPS, "data.synthetic_train_size=2048", f"train.epochs={epochs + 1}",
            *overrides],
            schema=CifarConfig)
        with distributed(cfg.dist) as rt:
            trainer = loop.Trainer(CifarTask(cfg), rt, Path(run_dir))
            trainer.sink.start(trainer.total_steps, 0)
            trainer.train_epoch(0)  # warm-up
            for epoch in range(1, epochs + 1):
                checking = epoch % 2 == 1  # alternate epoch by epoch, in the same processes
                # 1: agrees at the next step and recalibrates from there; 10**12: never within the epoch
                trainer.agreement.every = 1 if checking else 10**12
                trainer.state.epoch, trainer.state.step_in_epoch = epoch, 0
                start = time.perf_counter()
                trainer.train_epoch(epoch)
                rates[checking].append(trainer.steps_per_epoch / (time.perf_counter() - start))
            trainer.sink.stop()
            trainer.sink.close()
    if rank == 0:
        out.put((rates[True], rates[False]))


def stop_check_rates(epochs: int = 12, overrides: list[str] | None = None) -> tuple[list[float], list[float]]:
    """Steps/s of 2 gloo ranks with the stop agreement (the default interval) and without it, alternating
    epoch by epoch within one run, so that both settings see the same processes and machine state."""
    ctx = rank_context()
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_stop_check_rank, args=(r, port, epochs, overrides or [], out)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        with_check, without = out.get(timeout=900)
        return with_check, without
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()

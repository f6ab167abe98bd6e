"""Cost of the stop-signal agreement: steps/s of the real training loop with the agreement at every step
vs amortized (the default: about every 0.2 s of training, StopAgreement.interval_s), side by side.

2 gloo ranks (1 thread each) train a tiny model on tiny synthetic batches, so that steps are as fast as
the loop allows (hundreds per second) and any per-step overhead shows. The two settings alternate over
several repeats and the medians are compared.

    python bench/stop_check.py [--steps 600] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from bench.runs import rank_context

REPO = Path(__file__).resolve().parents[1]


def _rank(rank: int, port: int, steps: int, every_step: bool, out: "mp.Queue[float]") -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from launcher.config import load_config
    from launcher.runtime import distributed
    from trainers.cifar import CifarConfig, CifarTask
    from trainers.core import trainer as loop

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(REPO / "configs" / "cifar_debug.yaml", [
            f"run.dir={run_dir}", "run.progress=quiet", "checkpoint.every_epochs=0", "checkpoint.resume=never",
            "model.width=2", "data.synthetic_train_size=4096", "data.synthetic_test_size=10", "train.batch_size=4",
            f"train.max_steps={steps}", "train.epochs=10", "run.log_every=50", "data.loader=device",
            "eval.batch_size=10"], schema=CifarConfig)
        with distributed(cfg.dist) as rt:
            trainer = loop.Trainer(CifarTask(cfg), rt, Path(run_dir))
            if every_step:  # the agreement at every step, as before it was amortized
                trainer.agreement.interval_s, trainer.agreement.max_steps = 0.0, 1
            trainer.train_epoch(0)  # warm-up epoch: allocations, first-step costs
            trainer.state.global_step = 0
            start = time.perf_counter()
            trainer.train_epoch(1)
            seconds = time.perf_counter() - start
            trainer.sink.close()
    if rank == 0:
        out.put(trainer.state.global_step / seconds)


def steps_per_second(steps: int, every_step: bool) -> float:
    ctx = rank_context()
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, port, steps, every_step, out)) for r in range(2)]
    for p in procs:
        p.start()
    rate = out.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    return float(rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"every step": [], "amortized": []}
    for _ in range(args.repeats):  # interleaved: both see the same machine state
        rates["every step"].append(steps_per_second(args.steps, every_step=True))
        rates["amortized"].append(steps_per_second(args.steps, every_step=False))
    med = {k: statistics.median(v) for k, v in rates.items()}
    for kind, rate in med.items():
        print(f"{kind:>10}: {rate:8.1f} steps/s (median of {args.repeats}, 2 gloo ranks on {os.cpu_count()} cores)")
    print(f"amortized / every-step steps/s: {med['amortized'] / med['every step']:.3f}")


if __name__ == "__main__":
    main()

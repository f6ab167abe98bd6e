"""Sharded training against DDP on 2 gloo CPU ranks, on the language-model task (configs/lm_debug.yaml): time per
step, the bytes each rank holds in weights, gradients and optimizer state, and the time one sharded checkpoint
blocks training (written in place, and with checkpoint.async) as a fraction of an epoch.

    python -m bench.sharded [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.runs import rank_context

REPO = Path(__file__).resolve().parents[1]
#: lm_debug itself (an epoch of 115 steps of 32 windows of 64 bytes), without its samples and periodic checkpoints.
SETTINGS = ["sample.tokens=0", "checkpoint.every_epochs=0", "run.progress=quiet", "checkpoint.resume=never",
            "train.precision=fp32", "model.compile=false"]


def _held_bytes(trainer: Any) -> int:
    """Weights, gradients (one per weight, sharded alike) and optimizer state this rank holds."""
    from trainers.core.sharding import local

    weights = sum(local(p).nbytes for p in trainer.model.parameters())
    state = sum(local(t).nbytes for s in trainer.optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0)
    return 2 * weights + state


def _rank(rank: int, port: int, run_dir: str, overrides: list[str], out: Any) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from launcher.config import load_config
    from launcher.runtime import distributed
    from trainers.core.trainer import Trainer
    from trainers.lm import LMConfig, LMTask

    cfg = load_config(REPO / "configs" / "lm_debug.yaml", [f"run.dir={run_dir}", *SETTINGS, *overrides],
                      schema=LMConfig)
    with distributed(cfg.dist) as rt:
        trainer = Trainer(LMTask(cfg), rt, Path(run_dir))
        trainer.train_epoch(0)  # warm-up: allocations, first-step costs, the optimizer state
        trainer.state.epoch, trainer.state.step_in_epoch = 1, 0
        start = time.perf_counter()
        trainer.train_epoch(1)
        epoch = time.perf_counter() - start
        trainer.checkpointer.save(trainer.state.global_step - 1)  # warm-up: the first save's one-time costs
        if trainer.checkpointer.writer is not None:
            trainer.checkpointer.writer.wait()
        start = time.perf_counter()
        trainer.checkpointer.save(trainer.state.global_step)
        blocked = time.perf_counter() - start
        trainer.checkpointer.close()
        trainer.sink.close()
        result = {"step_s": epoch / trainer.steps_per_epoch, "epoch_s": epoch, "blocked_s": blocked,
                  "bytes": _held_bytes(trainer)}
    if rank == 0:
        out.put(result)


def measure(overrides: list[str]) -> dict[str, float]:
    """One 2-rank run of lm_debug with ``overrides``: step time, epoch time, checkpoint blocking, rank 0's bytes."""
    ctx = rank_context()
    out = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as run_dir:
        procs = [ctx.Process(target=_rank, args=(r, port, run_dir, overrides, out)) for r in range(2)]
        for p in procs:
            p.start()
        try:
            return dict(out.get(timeout=900))
        finally:
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()


def compare(repeats: int, extra: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Medians over interleaved repeats of DDP, FSDP (checkpoint in place) and FSDP (checkpoint.async)."""
    setups = {"ddp": ["dist.strategy=ddp"], "fsdp": ["dist.strategy=fsdp"],
              "fsdp-async": ["dist.strategy=fsdp", "checkpoint.async=true"]}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
    for _ in range(repeats):
        for name, overrides in setups.items():
            runs[name].append(measure([*overrides, *(extra or [])]))
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    m = compare(args.repeats, ["dist.device=cpu"])
    ddp, fsdp, fsdp_async = m["ddp"], m["fsdp"], m["fsdp-async"]
    print(f"time per step: FSDP {fsdp['step_s'] * 1000:.1f} ms vs DDP {ddp['step_s'] * 1000:.1f} ms "
          f"({fsdp['step_s'] / ddp['step_s']:.2f}x)")
    print(f"bytes per rank: FSDP {fsdp['bytes']:,.0f} vs DDP {ddp['bytes']:,.0f} ({fsdp['bytes'] / ddp['bytes']:.3f})")
    for name, r in (("in place", fsdp), ("async", fsdp_async)):
        print(f"sharded checkpoint {name}: blocked {r['blocked_s'] * 1000:.1f} ms of a {r['epoch_s']:.2f} s epoch "
              f"({r['blocked_s'] / r['epoch_s']:.4f})")


if __name__ == "__main__":
    main()

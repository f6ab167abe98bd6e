"""What the toolkit's training loop costs over a hand-written one: same model, batches, optimizer, data in
memory, one process, fp32. Prints the time ratio (interleaved repeats, medians) and checks that both end
with identical weights.

    python bench/trainer_overhead.py [--samples 8192] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from launcher.config import load_config
from launcher.env import resolve_env
from launcher.runtime import distributed
from trainers.core.rng import seed_everything
from trainers.cifar import CifarConfig, CifarTask
from trainers.cifar_data import CIFAR10_MEAN, CIFAR10_STD
from trainers.core.data import Normalize
from trainers.core.trainer import Trainer
from trainers.models import build_model

REPO = Path(__file__).resolve().parents[1]

BATCH = 128


def _config(run_dir: str, samples: int, device: torch.device) -> CifarConfig:
    return load_config(REPO / "configs" / "cifar_debug.yaml", [
        f"dist.device={device.type}", "train.precision=fp32", "model.compile=false",  # both sides alike
        f"run.dir={run_dir}", "run.progress=quiet", "checkpoint.resume=never", "checkpoint.every_epochs=0",
        f"data.synthetic_train_size={samples}", "data.synthetic_test_size=10", f"train.batch_size={BATCH}",
        "data.loader=device", "train.augment=false", "optim.weight_decay=0", "sched.name=constant",
        "sched.warmup_epochs=0", "model.width=16", "train.epochs=1", "eval.batch_size=10",
        "model.channels_last=false"], schema=CifarConfig)  # NCHW fp32, as the hand-written loop


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def toolkit(samples: int, device: torch.device = torch.device("cpu")) -> tuple[float, torch.Tensor]:
    """Seconds for one epoch of Trainer.train_epoch on ``device`` (fp32), and the final flat weights (on the CPU)."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = _config(run_dir, samples, device)
        with distributed(cfg.dist, resolve_env({})) as rt:
            trainer = Trainer(CifarTask(cfg), rt, Path(run_dir))
            start = time.perf_counter()
            trainer.train_epoch(0)
            _sync(device)
            seconds = time.perf_counter() - start
            trainer.sink.close()
            return seconds, torch.cat([p.detach().reshape(-1).cpu() for p in trainer.model.parameters()])


def by_hand(samples: int, device: torch.device = torch.device("cpu")) -> tuple[float, torch.Tensor]:
    """The same epoch as a plain loop on ``device`` (fp32): permutation, gather, normalise, forward, backward, step."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = _config(run_dir, samples, device)
        with distributed(cfg.dist, resolve_env({})) as rt:
            images, labels = (t.to(device) for t in CifarTask(cfg).build_data(rt)[0].tensors)
    seed_everything(cfg.run.seed)
    model = build_model(cfg.model.name, cfg.model.width).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=True)
    normalize = Normalize(CIFAR10_MEAN, CIFAR10_STD)
    g = torch.Generator().manual_seed(cfg.run.seed)  # DistributedSampler's order for epoch 0
    order = torch.randperm(len(labels), generator=g).to(device)
    start = time.perf_counter()
    for k in range(len(labels) // BATCH):
        idx = order[k * BATCH:(k + 1) * BATCH]
        loss = F.cross_entropy(model(normalize(images[idx])), labels[idx])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - start, torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    times: dict[str, list[float]] = {"toolkit": [], "by hand": []}
    for _ in range(args.repeats):  # interleaved: both see the same machine state
        t_kit, w_kit = toolkit(args.samples)
        t_hand, w_hand = by_hand(args.samples)
        times["toolkit"].append(t_kit)
        times["by hand"].append(t_hand)
    med = {k: statistics.median(v) for k, v in times.items()}
    steps = args.samples // BATCH
    for kind, seconds in med.items():
        print(f"{kind:>8}: {seconds:.3f} s for {steps} steps (median of {args.repeats})")
    print(f"toolkit / by-hand time: {med['toolkit'] / med['by hand']:.3f}")
    print(f"identical weights after {steps} steps: {torch.equal(w_kit, w_hand)}")


if __name__ == "__main__":
    main()

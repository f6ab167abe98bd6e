"""Input pipeline throughput: the device-resident loader vs torch's DataLoader, side by side.

Both feed identical batches (uint8 gather, normalisation, batched crop+flip augmentation) for one
epoch of a CIFAR-sized synthetic split; the two are interleaved over several repeats and the
medians compared, since these machines are noisy. No model: this isolates the data path.

    python bench/loader_throughput.py [--samples 50000] [--batch 512] [--repeats 5] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from trainers.cifar_data import CIFAR10_MEAN, CIFAR10_STD, synthetic_cifar10
from trainers.core.data import Augment, Normalize, ResumableDistributedSampler, TensorSplit, make_loader


def epoch_seconds(kind: str, split: TensorSplit, device: torch.device, batch: int, workers: int) -> float:
    sampler = ResumableDistributedSampler(split, 1, 0, seed=0, rank_batch_size=batch)
    sampler.set_epoch(0)
    normalize, augment = Normalize(CIFAR10_MEAN, CIFAR10_STD, device), Augment(len(split))
    loader = make_loader(kind, split, sampler, batch, True, device, workers)  # the device loader copies once
    start = time.perf_counter()
    for (images, _), index in loader.epoch(0, 0):
        x = augment(normalize(images), index, 0, 0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    del x
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    host = synthetic_cifar10(args.samples, seed=0)
    times: dict[str, list[float]] = {"dataloader": [], "device": []}
    for _ in range(args.repeats):  # interleaved: both see the same machine state
        times["dataloader"].append(epoch_seconds("dataloader", host, device, args.batch, args.workers))
        times["device"].append(epoch_seconds("device", host, device, args.batch, args.workers))
    med = {k: statistics.median(v) for k, v in times.items()}
    for kind, seconds in med.items():
        print(f"{kind:>10}: {args.samples / seconds:>12,.0f} samples/s  (median of {args.repeats}, {device})")
    print(f"device-resident / DataLoader throughput ratio: {med['dataloader'] / med['device']:.2f}x")


if __name__ == "__main__":
    main()

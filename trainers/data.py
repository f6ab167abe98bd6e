"""Sharding, resumable sample order, exact evaluation shards, loaders and batched augmentation.

The training order of an epoch is a pure function of (seed, epoch): a permutation of the dataset
truncated to whole global batches. Global batch k is always positions [k*B, (k+1)*B) of that
permutation whatever the world size (DistributedSampler's strided shards interleave within it), so
1 process and N ranks see the same samples per optimizer step, and a position inside the epoch is
just "optimizer steps done". Augmentation parameters are a pure function of (seed, epoch, sample
index), drawn for the whole epoch at once, so they survive resume and world-size changes too.
"""

from __future__ import annotations

import math
from typing import Iterator, Protocol, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

from launcher.config import ConfigError


def per_rank_batch(global_batch: int, world_size: int, grad_accum: int = 1) -> int:
    """Micro-batch size of one rank, derived from the configured global batch."""
    parts = world_size * grad_accum
    if global_batch % parts:
        lower, upper = global_batch // parts * parts, math.ceil(global_batch / parts) * parts
        raise ConfigError(
            f"train.batch_size={global_batch} (the global batch) does not divide into {world_size} ranks x "
            f"{grad_accum} accumulation steps; set train.batch_size to a multiple of {parts} "
            f"(e.g. {lower or parts} or {upper}) or change the number of ranks or train.grad_accum.")
    return global_batch // parts


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (drop_last, shuffled per ``set_epoch``) that can start an epoch part-way.

    ``set_epoch(epoch, start_step)`` skips the samples of the first ``start_step`` global batches, so a
    resumed run continues at the next unseen batch (also after a change of world size).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, per_rank_batch: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.per_rank_batch = per_rank_batch
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.per_rank_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.start_step = start_step

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_step * self.per_rank_batch:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_step * self.per_rank_batch)


class EvalShard(Sampler[int]):
    """Rank ``r`` of ``W`` evaluates samples r, r+W, r+2W, ...: every sample exactly once, no padding.

    Shards differ in length by at most one; evaluation must therefore run no collective per batch.
    """

    def __init__(self, length: int, num_replicas: int, rank: int) -> None:
        self.indices = range(rank, length, num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # uint8 images (b,3,H,W), labels, sample indices


class ArraySplit(Protocol):
    """A split held as tensors (what the device-resident loader needs)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int: ...


class ResidentSplit:
    """A split whose tensors live on the compute device (for the ``device`` loader): copied once per run."""

    def __init__(self, split: ArraySplit, device: torch.device) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)

    def __len__(self) -> int:
        return len(self.labels)


def _batches(sampler: Sampler[int], batch_size: int, drop_last: bool) -> BatchSampler:
    return BatchSampler(sampler, batch_size, drop_last=drop_last)


class DeviceLoader:
    """Whole split resident on the device; batches are gathers, no worker processes, no host copies."""

    def __init__(self, split: ArraySplit, sampler: Sampler[int], batch_size: int, drop_last: bool,
                 device: torch.device) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_sampler = _batches(sampler, batch_size, drop_last)
        self.device = device

    def __iter__(self) -> Iterator[Batch]:
        for idx in self.batch_sampler:
            i = torch.as_tensor(idx, device=self.device)
            yield self.images[i], self.labels[i], i

    def __len__(self) -> int:
        return len(self.batch_sampler)


class HostLoader:
    """A torch DataLoader over any map-style dataset of (image, label, index); batches moved to the device."""

    def __init__(self, dataset: Dataset, sampler: Sampler[int], batch_size: int, drop_last: bool,
                 device: torch.device, num_workers: int) -> None:
        # A private generator: otherwise each new iterator draws its worker seed from the global
        # torch RNG, and a resumed run (one iterator fewer) would see shifted random streams.
        self.loader = DataLoader(dataset, batch_sampler=_batches(sampler, batch_size, drop_last),
                                 num_workers=num_workers, pin_memory=device.type == "cuda",
                                 generator=torch.Generator().manual_seed(0))
        self.device = device

    def __iter__(self) -> Iterator[Batch]:
        for images, labels, idx in self.loader:
            yield (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True),
                   idx.to(self.device, non_blocking=True))

    def __len__(self) -> int:
        return len(self.loader)


def make_loader(kind: str, split: ArraySplit, sampler: Sampler[int], batch_size: int, drop_last: bool,
                device: torch.device, num_workers: int = 0) -> DeviceLoader | HostLoader:
    """``kind`` is data.loader: "device" or "dataloader"; both yield identical batches."""
    if kind == "device":
        return DeviceLoader(split, sampler, batch_size, drop_last, device)
    return HostLoader(split, sampler, batch_size, drop_last, device, num_workers)  # type: ignore[arg-type]


class Augment:
    """Random crop with zero padding and horizontal flip, as batched tensor ops.

    Per-sample parameters come from a generator seeded by (seed, epoch), drawn for all samples at
    once and looked up by sample index: no per-image Python, no dependence on global RNG state.
    """

    def __init__(self, num_samples: int, seed: int, pad: int = 4, flip: bool = True) -> None:
        self.num_samples, self.seed, self.pad, self.flip = num_samples, seed, pad, flip
        self._epoch = -1
        self._shift = self._mirror = torch.empty(0)

    def _draw(self, epoch: int, device: torch.device) -> None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        self._shift = torch.randint(0, 2 * self.pad + 1, (self.num_samples, 2), generator=g).to(device)
        self._mirror = (torch.rand(self.num_samples, generator=g) < 0.5).to(device)
        self._epoch = epoch

    def __call__(self, images: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor:
        """Augment a float batch (b, C, H, W) whose samples have dataset indices ``index``."""
        if self._epoch != epoch or self._shift.device != images.device:
            self._draw(epoch, images.device)
        b, c, h, w = images.shape
        padded = torch.nn.functional.pad(images, (self.pad,) * 4)
        shift = self._shift[index]
        rows = (shift[:, 0:1] + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (shift[:, 1:2] + torch.arange(w, device=images.device))[:, None, None, :]
        out = padded[torch.arange(b, device=images.device)[:, None, None, None],
                     torch.arange(c, device=images.device)[None, :, None, None], rows, cols]
        if self.flip:
            out = torch.where(self._mirror[index][:, None, None, None], out.flip(3), out)
        return out


class Normalize:
    """uint8 images to normalised float on the device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

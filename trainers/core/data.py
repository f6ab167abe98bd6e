"""Sample order, exact evaluation shards, loaders, per-sample seeding, and batches of any structure.

The training order of an epoch is a pure function of (seed, epoch): a permutation of the dataset
truncated to whole global batches. Global batch k is always positions [k*B, (k+1)*B) of that
permutation whatever the world size (DistributedSampler's strided shards interleave within it), so
1 process and N ranks see the same samples per optimizer step, and a position inside the epoch is
just "optimizer steps done".

Random transforms inside a Dataset (e.g. torchvision.transforms.v2 in DataLoader workers) draw from
the global RNGs of whichever process loads the sample. The loader therefore fetches every sample
under RNGs seeded from (seed, epoch, sample index), so a resumed run, any worker count and any world
size see exactly the same augmented samples.

A batch is whatever the Dataset's samples collate to (a tensor, a tuple, a dict, nested); every
loader yields ``(batch, index)`` where ``index`` holds the dataset indices of the batch's samples.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler
from torch.utils.data import default_collate

from launcher.config import ConfigError
from trainers.core.config import micro_batch_size
from trainers.core.rng import rngs_preserved, sample_seed, seed_global_rngs

__all__ = [
    "TensorSplit", "micro_batch_size", "ResumableDistributedSampler", "EvalShard", "sample_seed", "make_loader",
    "DeviceLoader", "HostLoader", "tree_map", "to_device", "chunk", "batch_len", "Augment", "Normalize",
    "shifted_crops",
]


# ----------------------------------------------------------------------------------- batches


def tree_map(fn: Callable[[torch.Tensor], Any], batch: Any) -> Any:
    """Apply ``fn`` to every tensor in a nested tuple/list/dict batch; other leaves are kept."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: tree_map(fn, v) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(tree_map(fn, v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(tree_map(fn, v) for v in batch)
    return batch


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of ``batch`` on ``device`` (asynchronously from pinned memory)."""
    return tree_map(lambda t: t.to(device, non_blocking=True), batch)


def _leaves(batch: Any) -> Iterator[Any]:
    if isinstance(batch, dict):
        for v in batch.values():
            yield from _leaves(v)
    elif isinstance(batch, (list, tuple)) and not (batch and isinstance(batch[0], str)):
        for v in batch:
            yield from _leaves(v)
    else:
        yield batch


def batch_len(batch: Any) -> int:
    """Number of samples in a batch: the length of its first tensor (or list of strings)."""
    for leaf in _leaves(batch):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
        if isinstance(leaf, (list, tuple)):
            return len(leaf)
    raise ValueError("cannot tell the number of samples of a batch that holds no tensor")


def chunk(batch: Any, parts: int) -> list[Any]:
    """Split a batch into ``parts`` micro-batches along the sample dimension (for gradient accumulation)."""
    if parts == 1:
        return [batch]
    n = batch_len(batch)
    bounds = [(i * n // parts, (i + 1) * n // parts) for i in range(parts)]
    return [_slice(batch, lo, hi, n) for lo, hi in bounds]


def _slice(batch: Any, lo: int, hi: int, n: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi] if batch.dim() > 0 and batch.shape[0] == n else batch
    if isinstance(batch, dict):
        return {k: _slice(v, lo, hi, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], str) and len(batch) == n:
        return type(batch)(batch[lo:hi])  # collated strings
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_slice(v, lo, hi, n) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice(v, lo, hi, n) for v in batch)
    return batch


# ----------------------------------------------------------------------------------- in-memory splits


class TensorSplit(Dataset):
    """A split held as tensors of equal length: sample ``i`` is ``tuple(t[i] for t in tensors)``.

    Works with both loaders; ``data.loader=device`` keeps the tensors on the compute device and
    gathers batches there (no worker processes, no host copies).
    """

    def __init__(self, *tensors: torch.Tensor) -> None:
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError(f"TensorSplit needs tensors of equal length, got {[len(t) for t in tensors]}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.tensors)

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The batch of samples ``index`` in one indexing operation per tensor."""
        return tuple(t[index] for t in self.tensors)


# ----------------------------------------------------------------------------------- order and shards


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (drop_last, shuffled per ``set_epoch``) that can start an epoch part-way.

    ``set_epoch(epoch, start_step)`` skips the samples of the first ``start_step`` global batches, so a
    resumed run continues at the next unseen batch (also after a change of world size).
    """

    def __init__(self, dataset: Any, num_replicas: int, rank: int, seed: int, rank_batch_size: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.rank_batch_size = rank_batch_size  # this rank's share of a global batch (all its micro-batches)
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.rank_batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_step = start_step

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_step * self.rank_batch_size:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_step * self.rank_batch_size)


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


class _Collated:
    """A batch already collated by ``__getitems__`` (in-memory splits gather whole batches at once)."""

    def __init__(self, batch: Any) -> None:
        self.batch = batch


def _collate(samples: Any) -> Any:
    return samples.batch if isinstance(samples, _Collated) else default_collate(samples)


class _KeyedDataset(Dataset):
    """Wraps a Dataset: fetches ``(index, seed)`` keys under seeded RNGs and returns ``(sample, index)``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        with rngs_preserved():
            return self._fetch(key)

    def __getitems__(self, keys: list[tuple[int, int]]) -> Any:
        if isinstance(self.dataset, TensorSplit):  # plain tensors: no transforms to seed, one gather
            indices = torch.tensor([i for i, _ in keys], dtype=torch.int64)
            return _Collated((self.dataset.gather(indices), indices))
        with rngs_preserved():  # once per batch: saving and restoring the RNGs costs more than seeding them
            return [self._fetch(key) for key in keys]

    def _fetch(self, key: tuple[int, int]) -> tuple[Any, int]:
        index, seed = key
        seed_global_rngs(seed)
        return self.dataset[index], index


class _KeyedBatches(Sampler[list[tuple[int, int]]]):
    """Batches of ``(index, per-sample seed)`` keys; runs in the main process, so ``stream`` is current."""

    def __init__(self, batches: BatchSampler) -> None:
        self.batches = batches
        self.stream = (0, 0)  # (seed, epoch), set before each pass

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        seed, epoch = self.stream
        for batch in self.batches:
            yield [(i, sample_seed(seed, epoch, i)) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


# ----------------------------------------------------------------------------------- loaders

Item = tuple[Any, torch.Tensor]  # (batch on the device, dataset indices of its samples)


class DeviceLoader:
    """A TensorSplit resident on the device; batches are gathers, no worker processes, no host copies."""

    def __init__(self, split: Any, sampler: Sampler[int], batch_size: int, drop_last: bool,
                 device: torch.device) -> None:
        if not isinstance(split, TensorSplit):
            raise ConfigError(f"data.loader=device needs in-memory tensor splits (a TensorSplit), but this task's "
                              f"data is a {type(split).__name__}; use data.loader=dataloader.")
        self.split = TensorSplit(*(t.to(device) for t in split.tensors))  # copied once per run
        self.batches = BatchSampler(sampler, batch_size, drop_last=drop_last)
        self.device = device

    def epoch(self, seed: int, epoch: int) -> Iterator[Item]:
        """One pass over the sampler's current order (``seed`` and ``epoch`` key host-side transforms only)."""
        for idx in self.batches:
            i = torch.as_tensor(idx, device=self.device)
            yield self.split.gather(i), i

    def __len__(self) -> int:
        return len(self.batches)

    def close(self) -> None:
        """Nothing to stop: no worker processes."""


class HostLoader:
    """A torch DataLoader over any map-style Dataset; samples fetched under per-sample seeds."""

    def __init__(self, dataset: Any, sampler: Sampler[int], batch_size: int, drop_last: bool,
                 device: torch.device, num_workers: int = 0, pin_memory: bool = True,
                 persistent_workers: bool = True, prefetch_factor: int = 2) -> None:
        self.keys = _KeyedBatches(BatchSampler(sampler, batch_size, drop_last=drop_last))
        workers: dict[str, Any] = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor} if num_workers else {}
        # A private generator: otherwise each new iterator draws its base seed from the global torch
        # RNG, and a resumed run (one iterator fewer) would see shifted random streams.
        self.loader = DataLoader(_KeyedDataset(dataset), batch_sampler=self.keys, num_workers=num_workers,
                                 collate_fn=_collate, pin_memory=pin_memory and device.type == "cuda",
                                 generator=torch.Generator().manual_seed(0), **workers)
        self.device = device

    def epoch(self, seed: int, epoch: int) -> Iterator[Item]:
        """One pass over the sampler's current order, every sample seeded by (seed, epoch, index)."""
        self.keys.stream = (seed, epoch)
        for batch, index in self.loader:
            yield to_device(batch, self.device), index.to(self.device, non_blocking=True)

    def __len__(self) -> int:
        return len(self.loader)

    def close(self) -> None:
        """Stop the worker processes now (persistent ones outlive each epoch). Left to the garbage collector, an
        iterator in a reference cycle loses its queues' feeder threads before its own clean-up runs (weakref
        callbacks come first), so its workers are never told to stop and are joined after 5 s each."""
        iterator = self.loader._iterator  # DataLoader has no public way to end its workers
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.loader._iterator = None


def build_loaders(cfg: Any, world_size: int, rank: int, device: torch.device, train: Any, evaluation: Any,
                  seed: int) -> tuple[ResumableDistributedSampler, DeviceLoader | HostLoader, DeviceLoader | HostLoader]:
    """This rank's training sampler and loader (its share of each global batch, in the seeded order) and its
    evaluation loader (its exact shard), as the config's ``data.*``, ``train.batch_size`` and
    ``eval.batch_size`` say (``cfg``: a run's resolved config)."""
    data = cfg.data
    workers = 0 if cfg.run.debug else data.num_workers  # debug: breakpoints in the Dataset work

    def loader(dataset: Any, sampler: Sampler[int], batch: int, training: bool) -> DeviceLoader | HostLoader:
        return make_loader(data.loader, dataset, sampler, batch, training, device, workers, pin_memory=data.pin_memory,
                           persistent_workers=data.persistent_workers and training,
                           prefetch_factor=data.prefetch_factor)

    rank_batch = cfg.train.batch_size // world_size  # this rank's share, cut into grad_accum micro-batches
    sampler = ResumableDistributedSampler(train, world_size, rank, seed, rank_batch)
    return (sampler, loader(train, sampler, rank_batch, True),
            loader(evaluation, EvalShard(len(evaluation), world_size, rank), max(1, cfg.eval.batch_size // world_size),
                   False))


def check_splits(train: Any, evaluation: Any, global_batch: int) -> None:
    """ConfigError when the training set cannot fill one global batch or the evaluation set is empty."""
    if len(train) < global_batch:
        raise ConfigError(f"The training set has {len(train)} samples, fewer than one global batch "
                          f"(train.batch_size={global_batch}); lower train.batch_size.")
    if len(evaluation) == 0:
        raise ConfigError("The evaluation set is empty; give the task evaluation data.")


def make_loader(kind: str, split: Any, sampler: Sampler[int], batch_size: int, drop_last: bool,
                device: torch.device, num_workers: int = 0, **dataloader: Any) -> DeviceLoader | HostLoader:
    """``kind`` is data.loader: "device" or "dataloader"; both yield identical batches."""
    if kind == "device":
        return DeviceLoader(split, sampler, batch_size, drop_last, device)
    return HostLoader(split, sampler, batch_size, drop_last, device, num_workers, **dataloader)


# ----------------------------------------------------------------------------------- batched transforms


class Augment:
    """Random crop (zero or reflect padding) and horizontal flip, as batched tensor ops on the device.

    Per-sample parameters come from a generator seeded by (seed, epoch), drawn for all samples at
    once and looked up by sample index: no per-image Python, no dependence on global RNG state.
    ``alternate_flip``: each image gets one random flip for the whole run (seeded by ``seed`` alone),
    reversed in every odd epoch, so that consecutive epochs see both orientations.
    """

    def __init__(self, num_samples: int, pad: int = 4, flip: bool = True, *, reflect: bool = False,
                 alternate_flip: bool = False) -> None:
        self.num_samples, self.pad, self.flip = num_samples, pad, flip
        self.reflect, self.alternate_flip = reflect, alternate_flip
        self._drawn: tuple[int, int, torch.device] | None = None
        self._shift = self._mirror = torch.empty(0)

    def _draw(self, seed: int, epoch: int, device: torch.device) -> None:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        self._shift = torch.randint(0, 2 * self.pad + 1, (self.num_samples, 2), generator=g).to(device)
        self._mirror = (torch.rand(self.num_samples, generator=g) < 0.5).to(device)
        if self.alternate_flip:
            once = torch.Generator().manual_seed(seed * 1_000_003 - 1)  # the same for every epoch
            self._mirror = ((torch.rand(self.num_samples, generator=once) < 0.5) ^ bool(epoch % 2)).to(device)
        self._drawn = (seed, epoch, device)

    def __call__(self, images: torch.Tensor, index: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
        """Augment a float batch (b, C, H, W) whose samples have dataset indices ``index``."""
        if self._drawn != (seed, epoch, images.device):
            self._draw(seed, epoch, images.device)
        out = images
        if self.pad:
            padded = torch.nn.functional.pad(images, (self.pad,) * 4, mode="reflect" if self.reflect else "constant")
            out = shifted_crops(padded, self._shift[index], images.shape[-2:])
        if self.flip:
            out = torch.where(self._mirror[index][:, None, None, None], out.flip(3), out)
        return out


def shifted_crops(padded: torch.Tensor, shifts: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """One window per image as a single gather: ``out[n] = padded[n, :, dy:dy+h, dx:dx+w]`` with
    ``(dy, dx) = shifts[n]`` and ``(h, w) = size``."""
    b, c = padded.shape[:2]
    h, w = size
    device = padded.device
    rows = (shifts[:, 0:1] + torch.arange(h, device=device))[:, None, :, None]
    cols = (shifts[:, 1:2] + torch.arange(w, device=device))[:, None, None, :]
    return padded[torch.arange(b, device=device)[:, None, None, None],
                  torch.arange(c, device=device)[None, :, None, None], rows, cols]


class Normalize:
    """uint8 (or [0, 255] float) images to normalised float on the device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | None = None) -> None:
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean.device != images.device:  # moved once, on the first batch
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        return (images.float() - self.mean) / self.std

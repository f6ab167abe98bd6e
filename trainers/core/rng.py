"""Every random stream of a run in one place: seeding, capture and restore for checkpoints, and the
per-sample seeds that make random transforms a pure function of (seed, epoch, sample index).

    seed_everything(seed)                 # python, numpy, torch (all devices)
    state = rng_state(device)             # what a checkpoint keeps of this rank
    set_rng_state(state, device)          # ...and gives back on resume
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import get_worker_info

__all__ = ["seed_everything", "rng_state", "set_rng_state", "RankRng", "sample_seed", "seed_global_rngs",
           "rngs_preserved"]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every random stream of this process, in a form that loads under ``weights_only=True``.

    The CUDA stream is this rank's own device's (``device``) only: asking for every GPU would make
    each rank create a context on all of them."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    keys = np.asarray(keys)
    return {
        "python": random.getstate(),  # (version, tuple of ints, None): plain data, loads fine
        # numpy's state holds a uint32 ndarray, which weights_only refuses; int64 holds it losslessly.
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None,
    }


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what ``rng_state()`` captured; the random streams continue exactly where they were."""
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    keys = n["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())  # map_location may have moved it; generators want CPU bytes
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda.cpu(), device)


def _as_tuples(value: Any) -> Any:
    # random.setstate needs tuples; a state that went through JSON or a list-based copy has lists.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample's random transforms: a pure function of its arguments."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ (epoch & _MASK64)) ^ index) >> 1


def seed_global_rngs(seed: int) -> None:
    """Seed the global RNGs that random transforms draw from: torch (CPU), python and numpy."""
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: seeding every GPU costs ~100x more
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextmanager
def rngs_preserved() -> Iterator[None]:
    """Restore the global RNGs afterwards, unless in a DataLoader worker (whose RNGs belong to nobody else)."""
    if get_worker_info() is not None:
        yield
        return
    saved = torch.default_generator.get_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.default_generator.set_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


class RankRng:
    """This rank's random streams as checkpoint state. Restored exactly at the same world size; at another
    one, each rank starts fresh streams from ``seed() + rank`` (as a new run would)."""

    def __init__(self, device: torch.device, rank: int, seed: Callable[[], int]) -> None:
        self.device, self.rank, self.seed = device, rank, seed

    def state_dict(self) -> dict[str, Any]:
        return rng_state(self.device)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state, self.device)

    def load_other_world(self, states: list[dict[str, Any]]) -> None:
        seed_everything(self.seed() + self.rank)

"""Where each benchmark row runs: its ranks, every rank's device and the precision of both sides, decided from the
hardware before anything runs, so that a row never asks for more GPUs than the host has and never compares
two sides that run on different devices or in different precisions.

    hardware = Hardware.here()               # or Hardware(gpus=1): what a one-GPU host would get
    for row in plan(hardware): ...            # row.device, row.precision, row.skipped
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Hardware", "RowPlan", "plan", "rank_device", "ROW_NAMES"]


@dataclass(frozen=True)
class Hardware:
    """What the bench may use: the number of visible GPUs (0: the CPU only)."""

    gpus: int

    @classmethod
    def here(cls) -> Hardware:
        import torch

        return cls(torch.cuda.device_count() if torch.cuda.is_available() else 0)

    @property
    def device(self) -> str:
        """The device of a one-process row."""
        return "cuda" if self.gpus else "cpu"


def rank_device(hardware: Hardware, ranks: int) -> str:
    """``cuda`` when every rank gets a GPU of its own, else ``cpu`` (gloo ranks): ranks never share a GPU."""
    return "cuda" if hardware.gpus >= ranks else "cpu"


@dataclass(frozen=True)
class RowPlan:
    """One row: how many ranks, on which device, in which precision (both sides), and why it is skipped, if so."""

    name: str
    ranks: int
    device: str  # "cuda" or "cpu", for every rank and both sides
    precision: str  # what both sides run, e.g. "fp32", or "toolkit auto (bf16) vs airbench fp16"
    reference: str = ""  # what the row compares against
    skipped: str = ""  # non-empty: the row does not run here, and this says why

    def overrides(self) -> list[str]:
        """The toolkit settings that pin this row's device (and precision, where one is fixed)."""
        pinned = [f"dist.device={self.device}"]
        return pinned + (["train.precision=fp32", "model.compile=false"] if self.precision == "fp32" else [])


ROW_NAMES = ("loader", "trainer overhead", "data parallel", "logging", "checkpoint (sync)", "checkpoint (async)",
             "stop check", "loop overhead", "against the reference", "device defaults", "CPU fast recipe",
             "LM tokens/s", "FSDP step time", "FSDP memory", "sharded checkpoint (sync)", "sharded checkpoint (async)")


def plan(hardware: Hardware) -> list[RowPlan]:
    """Every row of ``python -m bench`` on ``hardware`` (the device of 2-rank rows follows ``rank_device``)."""
    one, two = hardware.device, rank_device(hardware, 2)
    cuda = one == "cuda"
    return [
        RowPlan("loader", 1, one, "uint8 -> fp32", "torchvision's per-image pipeline"),
        RowPlan("trainer overhead", 1, one, "fp32", "a hand-written loop (identical weights)"),
        RowPlan("data parallel", 2, "cpu", "fp32", "1 process x 2 threads (CPU scaling: gloo ranks)"),
        RowPlan("logging", 2, two, "fp32", "no logging"),
        RowPlan("checkpoint (sync)", 1, one, "fp32", "an epoch"),
        RowPlan("checkpoint (async)", 1, one, "fp32", "an epoch"),
        RowPlan("stop check", 2, two, "fp32", "no agreement"),
        RowPlan("loop overhead", 1, one, "fp32", "the same recipe in a plain loop of the toolkit's pieces"),
        RowPlan("against the reference", 1, one,
                "toolkit auto (bf16) vs airbench fp16, as published" if cuda else "fp32",
                "the published airbench package (train94)" if cuda else
                "an independent hand-written airbench94 (imports nothing of the toolkit)"),
        RowPlan("device defaults", 1, one, "auto vs fp32, NCHW, eager", "all three off"),
        RowPlan("CPU fast recipe", 1, "cpu", "fp32", "configs/cifar_fast.yaml at full width",
                skipped="a recipe for CPUs: on this GPU host the full-width recipe is the one to run" if cuda else ""),
        RowPlan("LM tokens/s", 1, one, "fp32", "a hand-written nanoGPT-style loop (identical weights)"),
        RowPlan("FSDP step time", 2, two, "fp32", "DDP at 2 ranks (reported, no target)"),
        RowPlan("FSDP memory", 2, two, "fp32", "one DDP rank's weights, gradients and optimizer state"),
        RowPlan("sharded checkpoint (sync)", 2, two, "fp32", "an epoch of lm_debug"),
        RowPlan("sharded checkpoint (async)", 2, two, "fp32", "an epoch of lm_debug"),
    ]

"""The benchmark's reference loop (bench/airbench_loop.py) trains for real: a comparison against a loop that
does not learn would flatter the toolkit. Timing is judged by `python -m bench`, never here."""

from __future__ import annotations

import torch

from bench.airbench_loop import _crop, reference_run


def test_crop_takes_one_window_per_image() -> None:
    padded = torch.randn(3, 2, 8, 8)
    shifts = torch.tensor([[0, 1], [2, 2], [4, 0]])
    out = _crop(padded, shifts, 4)
    for i, (dy, dx) in enumerate(shifts.tolist()):
        assert torch.equal(out[i], padded[i, :, dy:dy + 4, dx:dx + 4])


def test_airbench_reference_loop_learns_synthetic_cifar() -> None:
    torch.set_num_threads(2)
    seconds, accuracy = reference_run(train=1024, test=500, batch=256, epochs=2, device=torch.device("cpu"))
    assert seconds > 0
    assert accuracy > 0.25, f"the reference loop reached only {accuracy:.3f} (chance: 0.1)"

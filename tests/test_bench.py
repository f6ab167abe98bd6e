"""The benchmark's reference loop (bench/airbench_loop.py) trains for real: a comparison against a loop that
does not learn would flatter the toolkit. Timing is judged by `python -m bench`, never here."""

from __future__ import annotations

import re

import pytest
import torch

from bench.airbench_loop import reference_run
from tests.dist_utils import PYTHON, run_command


def test_airbench_reference_loop_learns_synthetic_cifar() -> None:
    torch.set_num_threads(2)
    seconds, accuracy = reference_run(train=1024, test=500, batch=256, epochs=2, device=torch.device("cpu"))
    assert seconds > 0
    assert accuracy > 0.25, f"the reference loop reached only {accuracy:.3f} (chance: 0.1)"


@pytest.mark.timeout(960)  # about 2 minutes here; the subprocess bound below fails it first, with its output
def test_bench_quick_prints_one_table_with_every_row() -> None:
    """`python -m bench --quick` end to end (a smoke run: its ratios are not judged here)."""
    out = run_command([PYTHON, "-m", "bench", "--quick", "--repeats", "1"], timeout=900,
                      env={"OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line for line in out.stdout.splitlines() if re.match(r"\| \d+ \|", line)]
    names = [row.split("|")[2].strip() for row in rows]
    assert names == ["loader", "trainer overhead", "data parallel", "logging", "checkpoint (sync)",
                     "checkpoint (async)", "stop check", "fast recipe", "device defaults"]
    assert all(row.rstrip(" |").endswith(("met", "MISSED")) for row in rows)
    met = sum(row.rstrip(" |").endswith("| met") for row in rows)
    assert f"{met}/9 targets met" in out.stdout
    assert out.stdout.startswith("machine: ")

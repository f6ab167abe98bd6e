"""The benchmarks' plan and references, and ``make gpu-check``'s report, on the CPU. Timing is judged by
``python -m bench``, never here: these check that the rows run where they say, that the references really learn
(a comparison with a loop that does not learn would flatter the toolkit), and that every section is written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from bench.__main__ import QUICK_WIDTHS
from bench.airbench_loop import reference_run
from bench.plan import ROW_NAMES, Hardware, plan
from bench.reference_airbench import train_and_evaluate
from tests.dist_utils import PYTHON, run_command
from trainers.cifar import SYNTHETIC_SEED
from trainers.cifar_data import synthetic_cifar10


#: The quick bench's widths (a quarter of airbench94's): the loops are what these check, and narrow nets learn as well
#: in 2 epochs here.
NARROW = QUICK_WIDTHS


def test_airbench_reference_loop_learns_synthetic_cifar() -> None:
    seconds, accuracy = reference_run(train=1024, test=500, batch=256, epochs=2, device=torch.device("cpu"),
                                      widths=NARROW)
    assert seconds > 0
    assert accuracy > 0.25, f"the reference loop reached only {accuracy:.3f} (chance: 0.1)"


def test_the_independent_airbench_learns_and_imports_nothing_of_the_toolkit() -> None:
    source = (Path(__file__).resolve().parents[1] / "bench" / "reference_airbench.py").read_text()
    assert not re.search(r"^(from|import) (trainers|launcher|bench)", source, re.M), "independent of the toolkit"
    fit, held_out = synthetic_cifar10(1024, SYNTHETIC_SEED, train=True), synthetic_cifar10(500, SYNTHETIC_SEED, False)
    seconds, accuracy = train_and_evaluate(fit.images, fit.labels, held_out.images, held_out.labels, epochs=2,
                                           batch=256, widths=NARROW)
    assert seconds > 0 and accuracy > 0.25, f"reached only {accuracy:.3f} (chance: 0.1)"


def test_on_a_one_gpu_host_no_row_asks_for_a_second_gpu_and_both_sides_match() -> None:
    """What the bench would do with one GPU, decided without one: rows of two ranks run as gloo CPU ranks, the
    exactness rows pin fp32 on one device for both sides, the reference is the published package."""
    rows = {r.name: r for r in plan(Hardware(gpus=1))}
    assert tuple(rows) == ROW_NAMES
    assert all(r.device == "cpu" for r in rows.values() if r.ranks > 1), "two ranks never share the one GPU"
    assert rows["trainer overhead"].device == "cuda" and rows["trainer overhead"].overrides() == [
        "dist.device=cuda", "train.precision=fp32", "model.compile=false"], "both sides: the GPU, fp32"
    assert rows["logging"].overrides()[0] == "dist.device=cpu"
    assert "published airbench" in rows["against the reference"].reference
    assert rows["CPU fast recipe"].skipped and not any(r.skipped for n, r in rows.items() if n != "CPU fast recipe")
    two = {r.name: r for r in plan(Hardware(gpus=2))}
    assert two["logging"].device == "cuda" and two["data parallel"].device == "cpu", "CPU scaling stays on the CPU"
    cpu = {r.name: r for r in plan(Hardware(gpus=0))}
    assert all(r.device == "cpu" and not r.skipped for r in cpu.values())
    assert "independent" in cpu["against the reference"].reference


@pytest.mark.timeout(960)  # about 2 minutes here; the subprocess bound below fails it first, with its output
def test_gpu_check_on_the_cpu_reports_every_section(tmp_path: Path) -> None:
    """`python -m bench.gpu_check OUT --quick`: the machine, the GPU tests (each saying why it does not run here),
    the speed table with all its rows, and the fast recipe's times, in gpu-report.md and .json."""
    out = tmp_path / "report"
    result = run_command([PYTHON, "-m", "bench.gpu_check", str(out), "--quick"], timeout=900)
    report = (out / "gpu-report.md").read_text()
    steps = json.loads((out / "gpu-report.json").read_text())
    assert [s["name"] for s in steps] == ["machine", "GPU tests (pytest -m gpu)", "benchmarks (python -m bench)",
                                          "fast recipe"], result.stdout
    assert all(s["status"] == "ok" for s in steps), report
    assert "no GPU on this host" in report
    assert report.count("needs a CUDA GPU") >= 8, "every GPU test says why it does not run here"
    rows = [line for line in report.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [row.split("|")[2].strip() for row in rows] == list(ROW_NAMES)
    assert all(row.rstrip(" |").endswith(("met", "MISSED", "skipped")) for row in rows)
    assert re.search(r"\d+/\d+ targets met", report)
    assert "epoch time: the first" in report and "no time-to-94% claim" in report
    assert (out / "bench.json").exists() and (out / "fast-recipe.log").exists()

"""``make gpu-check [OUT=gpu-check]``: every figure a first session on a GPU must bring back, in one command.

    python -m bench.gpu_check OUT_DIR [--quick]

Steps, each bounded in time and each recorded as soon as it ends, so that a run cut short still leaves its
partial report; a failing step never stops the ones after it:

1. the machine: GPU, driver, torch and CUDA versions;
2. ``pytest -m gpu``: nccl, CUDA autocast and GradScaler, SyncBatchNorm, compile, the device loader, no host sync
   between log steps, whole runs (each test runs or says why not);
3. ``python -m bench``: the speed table (with the published airbench package as the reference on a GPU);
4. the fast recipe (configs/cifar_fast.yaml) on real CIFAR-10 when it can be read or downloaded, else on 50,000
   synthetic CIFAR-shaped images: the epoch time, the recipe's time, and the time to 94% when it gets there.

It writes ``OUT_DIR/gpu-report.md`` and ``OUT_DIR/gpu-report.json`` (plus each step's log). ``--quick`` shrinks every
workload (a smoke run: how the tests check this command on a CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Step:
    name: str
    status: str = "not run"  # ok, failed, timed out, not run
    seconds: float = 0.0
    summary: list[str] = field(default_factory=list)  # markdown lines for the report
    data: dict[str, Any] = field(default_factory=dict)


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[str, str]:
    """(status, output): the command's output also goes to ``log`` as it runs."""
    with open(log, "w") as out:
        try:
            done = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
            status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
    return status, log.read_text(errors="replace")


def machine(step: Step, out: Path, quick: bool) -> None:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip() if shutil.which("nvidia-smi") else ""
    step.data = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
                 "cuda build": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "gpus": gpus,
                 "nvidia-smi": smi}
    step.summary = [f"- {k}: {v or '-'}" for k, v in step.data.items()]
    if not gpus:
        step.summary.append("- **no GPU on this host: the GPU figures below are not measured here**")
    step.status = "ok"


def gpu_tests(step: Step, out: Path, quick: bool) -> None:
    step.status, text = _run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider",
                              "tests/test_gpu.py"], out / "gpu-tests.log", 300)
    results = [line for line in text.splitlines() if line.startswith(("PASSED", "FAILED", "SKIPPED", "ERROR"))]
    tail = [line for line in text.splitlines() if " passed" in line or " failed" in line or " skipped" in line]
    step.summary = [f"- `{line}`" for line in results] + ([f"- {tail[-1]}"] if tail else [])
    step.data = {"results": results}


def benchmarks(step: Step, out: Path, quick: bool) -> None:
    rows = out / "bench.json"
    cmd = [sys.executable, "-m", "bench", "--repeats", "1", "--json", str(rows), *(["--quick"] if quick else [])]
    step.status, text = _run(cmd, out / "bench.log", 600)
    step.summary = [line for line in text.splitlines() if line.startswith("|") or "targets met" in line]
    step.data = json.loads(rows.read_text()) if rows.exists() else {}


def fast_recipe(step: Step, out: Path, quick: bool) -> None:
    run_dir = out / "fast-recipe"
    shutil.rmtree(run_dir, ignore_errors=True)
    batch = 256 if quick else 1024
    # --quick checks that the step runs and reports, not the recipe's figures: a quarter of the widths, 2 x 2 steps.
    smoke = ["data.synthetic_train_size=512", "data.synthetic_test_size=250", "train.epochs=2",
             "model.widths=[16,64,64]", f"train.batch_size={batch}", "optim.lr=0.75"]
    size = smoke if quick else ["data.synthetic_train_size=50000"]
    cmd = [sys.executable, "-m", "trainers.cifar", "--config", "configs/cifar_fast.yaml", f"run.dir={run_dir}",
           "data.synthetic_fallback=true", "run.progress=lines", "eval.every_epochs=10", *size]
    step.status, text = _run(cmd, out / "fast-recipe.log", 300)
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    real = "real CIFAR-10" in text
    step.data["data"] = "real CIFAR-10" if real else "synthetic CIFAR-shaped images (no CIFAR-10 here)"
    step.summary.append(f"- data: {step.data['data']}")
    epochs = [r for r in records if r["kind"] == "epoch"]
    steps = [r["step"] - (epochs[i - 1]["step"] if i else 0) for i, r in enumerate(epochs)]
    seconds = [n * batch / r["samples_per_s"] for n, r in zip(steps, epochs)]
    if seconds:
        step.data["epoch_seconds"] = seconds
        later = sorted(seconds[1:] or seconds)
        step.summary.append(f"- epoch time: the first {seconds[0]:.2f} s (compile and autotuning), then "
                            f"{later[len(later) // 2]:.2f} s (median)")
    end = next((r for r in records if r["kind"] == "end"), None)
    if end is not None:
        accuracy = float(end.get("test_acc", float("nan")))
        step.data.update({"seconds": end["seconds"], "test_acc": accuracy})
        claim = (f"; **time to 94%: {end['seconds']:.1f} s**" if real and accuracy >= 0.94 else
                 " (no time-to-94% claim: 94% was not reached on real CIFAR-10 here)")
        step.summary.append(f"- the recipe: {end['seconds']:.1f} s for {end['step']} steps, test accuracy "
                            f"{accuracy:.4f}{claim}")


STEPS: list[tuple[str, Callable[[Step, Path, bool], None]]] = [
    ("machine", machine), ("GPU tests (pytest -m gpu)", gpu_tests), ("benchmarks (python -m bench)", benchmarks),
    ("fast recipe", fast_recipe)]


def write_report(out: Path, steps: list[Step], started: float) -> None:
    lines = [f"# GPU check ({time.strftime('%Y-%m-%d %H:%M')}, {time.perf_counter() - started:.0f} s so far)", ""]
    for step in steps:
        lines += [f"## {step.name}: {step.status} ({step.seconds:.0f} s)", "", *step.summary, ""]
    (out / "gpu-report.md").write_text("\n".join(lines))
    (out / "gpu-report.json").write_text(json.dumps([asdict(s) for s in steps], indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for gpu-report.md, gpu-report.json and the logs")
    parser.add_argument("--quick", action="store_true", help="small workloads: a smoke run")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    steps = [Step(name) for name, _ in STEPS]
    for step, (_, run) in zip(steps, STEPS):
        print(f"gpu-check: {step.name} ...", flush=True)
        begin = time.perf_counter()
        try:
            run(step, args.out, args.quick)
        except Exception as e:  # noqa: BLE001 - a broken step must not cost the figures of the others
            step.status = f"failed ({type(e).__name__}: {e})"
        step.seconds = time.perf_counter() - begin
        print(f"gpu-check: {step.name}: {step.status} ({step.seconds:.0f} s)", flush=True)
        write_report(args.out, steps, started)
    print(f"gpu-check: report in {args.out / 'gpu-report.md'} ({time.perf_counter() - started:.0f} s)")
    return 0 if all(s.status == "ok" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())

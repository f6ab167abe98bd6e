"""Helpers for the ``python -m launcher submit`` tests (local executor and real SLURM)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from filelock import FileLock

from tests.dist_utils import REPO, fork_ranks, wait_all, wait_for

DEBUG_CONFIG = REPO / "configs" / "cifar_debug.yaml"

#: 128 steps of the debug model at half its width (8 epochs of 16; about 6 s on 2 gloo ranks, 12 s under the
#: parallel suite's load): room to interrupt a run twice, each time right after a logged step. The steps are what
#: these tests need, not their cost: at the debug width the same run takes about twice as long.
LONG_STEPS = 128
LONG = [f"train.epochs={LONG_STEPS // 16}", "model.width=8", "run.log_every=1", "run.deterministic=true",
        "run.progress=lines"]

#: Launcher variables that would confuse the job if pytest inherited them (e.g. run inside SLURM).
_FOREIGN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
_FOREIGN_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "ACCELERATE_", "SUBMITIT_")


def job_environ() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _FOREIGN_VARS and (k == "SLURM_CONF" or not k.startswith(_FOREIGN_PREFIXES))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # sbatch exports this environment: the job's `python` is the one running the tests
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def submit_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "launcher", "submit", *args]


def start_submit(args: list[str], cwd: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """Start ``python -m launcher submit ARGS``; returns the process and the job id it printed."""
    out = open(log, "w")
    proc = subprocess.Popen(submit_cmd(*args), cwd=cwd, env=job_environ(), stdout=out, stderr=subprocess.STDOUT)
    found: list[str] = []

    def printed_job() -> bool:
        if proc.poll() not in (None, 0):
            raise AssertionError(f"submit failed ({proc.returncode}):\n{log.read_text()}")
        found[:] = re.findall(r"^\s+job (\S+): run directory", log.read_text(), re.M)
        return bool(found)

    wait_for(printed_job, 120, "the job id printed by submit", poll=0.1)
    return proc, found[0]


def straight_long_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted reference of the interruption tests: the LONG debug run on 2 ranks (forked, see fork_ranks:
    how a job starts is what those tests check, not how their reference does). Trained once per test session and
    shared by every test (and parallel worker) that compares with it: a file lock in the session's folder lets the
    first one train it while the others wait."""
    # Under xdist each worker has a folder of its own inside the session's; without it the session's is the base.
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    run_dir = root / "straight-long" / "run"
    with FileLock(str(root / "straight-long.lock"), timeout=420):
        if not (run_dir / "model.pt").is_file():
            shutil.rmtree(run_dir.parent, ignore_errors=True)
            run_dir.parent.mkdir(parents=True)
            logs = run_dir.parent / "logs"
            logs.mkdir()
            codes = wait_all(fork_ranks(["trainers.cifar", "--config", str(DEBUG_CONFIG), *LONG, f"run.dir={run_dir}"],
                                        2, logs), 300, logs)
            assert codes == [0, 0], (logs / "rank0.log").read_text()[-3000:]
    return run_dir


def records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return [r for r in rows if r["kind"] == kind]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"weights differ between {a} and {b}: {different[:5]}"


def assert_every_step_once(run_dir: Path, steps: int) -> None:
    """The interrupted run trained each step exactly once: resumed at the next unseen batch."""
    logged = [r["step"] for r in records(run_dir, "train")]
    assert logged == list(range(1, steps + 1)), f"steps logged: {logged}"

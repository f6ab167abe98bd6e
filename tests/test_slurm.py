"""End-to-end tests on a real SLURM cluster: srun training and sbatch scripts without srun.

They need a running cluster (a single node is enough: `sudo slurm/local_cluster.sh`) and are
skipped only when sbatch/srun are not on PATH or `scontrol ping` fails. Every job is bounded
twice: by a SLURM time limit and by a subprocess timeout, after which the job is cancelled.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.dist_utils import REPO

DEBUG_CONFIG = REPO / "configs" / "cifar_debug.yaml"
# Subprocess bound for one SLURM command; the pytest timeout below leaves room for clean-up.
COMMAND_TIMEOUT_S = 300

# Launcher variables that would override or confuse the SLURM ones if pytest inherited them
# (e.g. when the suite itself runs under torchrun or inside a SLURM allocation).
_FOREIGN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
_FOREIGN_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "ACCELERATE_", "SUBMITIT_")


def _cluster_unavailable() -> str | None:
    """Why no SLURM job can run here, or None when the controller answers."""
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        return (f"SLURM not installed ({' and '.join(missing)} not on PATH); "
                "start a local cluster with `sudo slurm/local_cluster.sh`")
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`scontrol ping` failed ({e}); start the cluster with `sudo slurm/local_cluster.sh`"
    if ping.returncode != 0 or "DOWN" in ping.stdout:
        answer = (ping.stdout + ping.stderr).strip().splitlines()
        return (f"`scontrol ping` failed ({answer[0] if answer else f'exit {ping.returncode}'}); "
                "start the cluster with `sudo slurm/local_cluster.sh`")
    return None


_UNAVAILABLE = _cluster_unavailable()
pytestmark = [
    pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or ""),
    pytest.mark.timeout(COMMAND_TIMEOUT_S + 60),
]


def _job_environ() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _FOREIGN_VARS and (k == "SLURM_CONF" or not k.startswith(_FOREIGN_PREFIXES))}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_job(cmd: list[str], job_name: str, timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run an srun/sbatch command; on timeout cancel its job (by its unique name) and fail."""
    try:
        return subprocess.run(cmd, cwd=REPO, env=_job_environ(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        subprocess.run(["scancel", f"--name={job_name}"], timeout=30, check=False)
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"{cmd[0]} did not finish within {timeout}s; job {job_name} cancelled. Output:\n{out[-4000:]}")


def _job_name(kind: str) -> str:
    return f"test-slurm-{kind}-{uuid.uuid4().hex[:8]}"


def test_srun_two_ranks_train_cifar(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    name = _job_name("srun")
    cmd = ["srun", f"--job-name={name}", "--ntasks=2", "--nodes=1", "--kill-on-bad-exit=1", "--time=5",
           f"--chdir={REPO}", sys.executable, "-m", "trainers.cifar", "--config", str(DEBUG_CONFIG),
           f"run.dir={run_dir}", "train.epochs=1", "run.progress=lines"]
    result = _run_job(cmd, name)
    out = result.stdout
    assert result.returncode == 0, f"srun exited {result.returncode}:\n{out[-4000:]}"
    assert re.search(r"launch\s+slurm\b", out), f"startup table does not say launch slurm:\n{out[-4000:]}"
    assert "2 rank(s)" in out, out[-4000:]
    for produced in ("metrics.jsonl", "model.pt", "config.yaml"):
        assert (run_dir / produced).is_file(), f"{produced} missing from {run_dir}: {sorted(os.listdir(run_dir))}"


_PRINT_ENV = "import os; from launcher.env import DistEnv; print(DistEnv.from_environ(os.environ))"


def _sbatch_without_srun(tmp_path: Path, ntasks: int) -> tuple[int, str]:
    """sbatch --wait a script whose python line runs directly in the batch shell (no srun)."""
    name = _job_name(f"n{ntasks}")
    out_file = tmp_path / f"{name}.out"
    script = tmp_path / f"{name}.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --job-name={name}\n"
        f"#SBATCH --ntasks={ntasks}\n"
        "#SBATCH --nodes=1\n"
        "#SBATCH --time=2\n"
        f"#SBATCH --output={out_file}\n"
        f"#SBATCH --chdir={REPO}\n"
        f"'{sys.executable}' -c '{_PRINT_ENV}'\n"
    )
    result = _run_job(["sbatch", "--wait", str(script)], name, timeout=180)
    assert out_file.is_file(), f"sbatch wrote no output file {out_file}; sbatch said:\n{result.stdout}"
    return result.returncode, out_file.read_text()


def test_sbatch_single_task_without_srun_is_slurm_world_1(tmp_path: Path) -> None:
    rc, out = _sbatch_without_srun(tmp_path, ntasks=1)
    assert rc == 0, f"job failed (sbatch --wait exit {rc}):\n{out}"
    assert "launcher='slurm'" in out, out
    assert "world_size=1," in out, out
    assert "rank=0," in out, out


def test_sbatch_two_tasks_without_srun_asks_for_srun(tmp_path: Path) -> None:
    rc, out = _sbatch_without_srun(tmp_path, ntasks=2)
    assert rc != 0, f"a 2-task job without srun should fail, but it succeeded:\n{out}"
    assert "LaunchError" in out, out
    assert "not inside an srun job step" in out, out
    assert "srun python" in out, out

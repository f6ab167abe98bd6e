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
import time
import uuid
from pathlib import Path

import pytest

from tests.dist_utils import REPO, wait_all, wait_for
from tests.submit_utils import (LONG, LONG_STEPS, assert_every_step_once, assert_same_weights, job_environ, records,
                                start_submit, straight_long_run, submit_cmd)

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
# `make test` runs test files in parallel but each file's tests in order on one worker (--dist loadfile): the SLURM
# tests stay in this file, since the local cluster has 2 CPUs and two jobs at once would queue behind each other.


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


@pytest.mark.parametrize("task", [["trainers.cifar", "--config", str(DEBUG_CONFIG), "train.epochs=1"],
                                  ["trainers.lm", "--config", str(REPO / "configs" / "lm_debug.yaml"),
                                   "data.synthetic_bytes=20000", "train.max_steps=6", "sample.tokens=20",
                                   "dist.strategy=fsdp"]],
                         ids=["cifar", "lm-fsdp"])
def test_srun_two_ranks_train(tmp_path: Path, task: list[str]) -> None:
    run_dir = tmp_path / "run"
    name = _job_name("srun")
    cmd = ["srun", f"--job-name={name}", "--ntasks=2", "--nodes=1", "--kill-on-bad-exit=1", "--time=5",
           f"--chdir={REPO}", sys.executable, "-m", *task, f"run.dir={run_dir}", "run.progress=lines"]
    result = _run_job(cmd, name)
    out = result.stdout
    assert result.returncode == 0, f"srun exited {result.returncode}:\n{out[-4000:]}"
    assert re.search(r"launch\s+slurm\b", out), f"startup table does not say launch slurm:\n{out[-4000:]}"
    assert "2 rank(s)" in out, out[-4000:]
    for produced in ("metrics.jsonl", "model.pt", "config.yaml"):
        assert (run_dir / produced).is_file(), f"{produced} missing from {run_dir}: {sorted(os.listdir(run_dir))}"


_PRINT_ENV = "import os; from launcher.env import resolve_env; print(resolve_env(os.environ))"


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


# ------------------------------------------------------------------ python -m launcher submit


def _job_state(job: str) -> str | None:
    """The job's state as squeue shows it, "" once SLURM no longer lists it, None if squeue failed (busy)."""
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        return None
    return out.stdout.strip()


def _node_idle() -> bool:
    """The node has finished cleaning up after the previous run of a requeued job (not COMPLETING)."""
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return out.returncode == 0 and out.stdout.split() == ["idle"]


def _start_now_when_pending(job: str) -> None:
    """A requeued job waits about two minutes before it may start again; let it start at once, but only once
    the node has finished with its previous run (started earlier, slurmd refuses it: "credential revoked")."""
    wait_for(lambda: _job_state(job) == "PENDING" and _node_idle(), 120,
             f"job {job} to be requeued (PENDING) and the node to be idle", poll=0.2)
    # slurmd refuses a launch credential issued in the same second as the revocation of the previous run's
    # ("Job credential revoked"; it compares whole seconds), so the new start must fall in a later second.
    requeued_at = int(time.time())
    wait_for(lambda: int(time.time()) >= requeued_at + 2, 5, "the clock to pass the revocation second", poll=0.05)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)


def _wait_job_gone(job: str, timeout: float = COMMAND_TIMEOUT_S) -> None:
    try:
        wait_for(lambda: _job_state(job) == "", timeout, f"job {job} to end", poll=0.5)
    finally:
        if _job_state(job):
            subprocess.run(["scancel", job], timeout=30, check=False)


def test_submit_wait_two_ranks_trains_to_completion(tmp_path: Path) -> None:
    result = subprocess.run(submit_cmd("--tasks-per-node", "2", "--time", "5", "--wait", "-m", "trainers.cifar",
                                       "--config", str(DEBUG_CONFIG), "run.progress=lines"),
                            cwd=tmp_path, env=job_environ(), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    job = re.search(r"job (\d+): run directory (\S+)", result.stdout)
    assert job, result.stdout
    run_dir = Path(job.group(2))
    assert run_dir == tmp_path / "runs" / f"cifar-debug-{job.group(1)}"
    assert {"checkpoints", "config.yaml", "metrics.jsonl", "model.pt"} <= {p.name for p in run_dir.iterdir()}
    start = records(run_dir, "start")
    assert len(start) == 1 and start[0]["world_size"] == 2 and start[0]["launcher"] == "submitit", start
    logs = sorted((tmp_path / "runs" / "submitit" / job.group(1)).glob("*_log.out"))
    assert len(logs) == 2, logs
    assert "checkpoint step-" in logs[0].read_text()
    assert "checkpoint step-" not in logs[1].read_text(), "only rank 0 writes and reports checkpoints"


def test_submitted_job_survives_time_limit_signal_and_preemption(tmp_path: Path,
                                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    """The time-limit signal (USR2, submitit's) and then a preemption (`scontrol requeue`: SIGTERM) hit
    the same job; each time it checkpoints and is requeued, and it ends with the weights of an
    uninterrupted run of the same configuration."""
    common = ["--tasks-per-node", "2", "--time", "10", "-m", "trainers.cifar", "--config", str(DEBUG_CONFIG), *LONG]
    straight = straight_long_run(tmp_path_factory)

    run_dir = tmp_path / "interrupted"
    proc, job = start_submit([*common, f"run.dir={run_dir}"], tmp_path, tmp_path / "submit.log")
    assert wait_all([proc], 60, log_file=tmp_path / "submit.log") == [0]
    try:
        wait_for(lambda: bool(records(run_dir, "train")), 120, "the first training step", poll=0.05)
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)  # as --signal=USR2@N does
        _start_now_when_pending(job)
        wait_for(lambda: len(records(run_dir, "start")) == 2 and records(run_dir, "train")[-1]["step"] >
                 records(run_dir, "start")[1]["step"], 120, "the requeued job to train again", poll=0.05)
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)  # preemption: SIGTERM, then requeue
        _start_now_when_pending(job)
        _wait_job_gone(job)
    finally:
        subprocess.run(["scancel", job], timeout=30, check=False)
    log = (tmp_path / "runs" / "submitit" / job / f"{job}_0_log.out").read_text()
    starts = records(run_dir, "start")
    assert len(starts) == 3, f"expected 3 starts (2 requeues), got {starts}\n{log[-3000:]}"
    assert [s["slurm_requeues"] for s in starts] == [0, 1, 2] and all(s["step"] > 0 for s in starts[1:]), starts
    assert log.count("Stop signal received: checkpoint written") == 2, log[-3000:]
    assert "Requeued job" in log, "the time-limit signal was handed to submitit, which requeued the job"
    assert_every_step_once(run_dir, LONG_STEPS)
    assert_same_weights(run_dir, straight)


@pytest.mark.parametrize("template", ["cifar.sbatch", "torchrun.sbatch"])
def test_sbatch_template_requeues_near_the_time_limit_and_completes(tmp_path: Path, template: str) -> None:
    """The templates for users without submitit: the time-limit warning (USR1 to the batch shell) leads to
    a checkpoint and a requeue, and the requeued job completes."""
    run_dir = tmp_path / "run"
    out = tmp_path / "job.out"
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={REPO}", f"--output={out}", "--time=10",
         str(REPO / "slurm" / template), "--config", str(DEBUG_CONFIG), f"run.dir={run_dir}", *LONG],
        cwd=REPO, env=job_environ(), capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: bool(records(run_dir, "train")), 120, "the first training step", poll=0.05)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
        _start_now_when_pending(job)
        _wait_job_gone(job)
    finally:
        subprocess.run(["scancel", job], timeout=30, check=False)
    text = out.read_text()
    assert "time limit near" in text and f"requeueing job {job}" in text, text[-3000:]
    starts = records(run_dir, "start")
    assert len(starts) == 2 and starts[1]["step"] > 0 and starts[1]["slurm_requeues"] == 1, starts
    assert_every_step_once(run_dir, LONG_STEPS)
    assert (run_dir / "model.pt").is_file(), text[-3000:]

"""``python -m launcher submit`` without a cluster: the command line, the sbatch script (golden file),
and real jobs on submitit's local executor, including the signal hand-over that requeues them.

The same jobs on a real SLURM cluster are in tests/test_slurm.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launcher.submit import TrainJob, add_parser, expand_sweep, ranks_per_node, resources
from tests.dist_utils import REPO, run_command, wait_all, wait_for
from tests.gated_task import GATE_VARIABLE
from tests.submit_utils import (DEBUG_CONFIG, LONG, LONG_STEPS, assert_every_step_once, assert_same_weights,
                                job_environ, records, start_submit, straight_long_run,
                                submit_cmd)

GOLDEN = Path(__file__).parent / "golden" / "submit_dry_run.sbatch"

pytestmark = pytest.mark.timeout(400)


def _children(pid: int) -> list[int]:
    """The task processes submitit's local controller started (its direct children)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def _signal_tasks(controller: int, sig: signal.Signals, count: int) -> None:
    tasks: list[int] = []

    def started() -> bool:
        tasks[:] = _children(controller)
        return len(tasks) == count

    wait_for(started, 60, f"{count} task processes of the local job", poll=0.05)
    for pid in tasks:
        os.kill(pid, sig)


# ------------------------------------------------------------------------------- command line


def test_sweep_values_make_one_job_per_combination() -> None:
    assert expand_sweep(["optim.lr=0.1,0.2", "train.epochs=3", "run.seed=0,1"]) == [
        ["optim.lr=0.1", "train.epochs=3", "run.seed=0"], ["optim.lr=0.1", "train.epochs=3", "run.seed=1"],
        ["optim.lr=0.2", "train.epochs=3", "run.seed=0"], ["optim.lr=0.2", "train.epochs=3", "run.seed=1"]]
    assert expand_sweep(["optim.betas=[0.9,0.95]"]) == [["optim.betas=[0.9,0.95]"]]  # a list is one value


def test_flags_win_over_the_config_slurm_section() -> None:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["submit", "--gpus-per-node", "4", "--time", "30", "--sbatch", "exclude=n1", "-m", "x"])
    res = resources(args, {"nodes": 2, "time_min": 600, "partition": "gpu", "sbatch": ["mail-type=END"]})
    assert (res.nodes, res.time_min, res.partition, res.gpus_per_node) == (2, 30, "gpu", 4)
    assert ranks_per_node(res) == 4  # one task per GPU when --tasks-per-node is not given
    assert res.sbatch == ("mail-type=END", "exclude=n1")


def test_dry_run_prints_the_sbatch_script(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    result = run_command(submit_cmd("--dry-run", "--nodes", "2", "--gpus-per-node", "4", "--time", "90",
                                    "--partition", "gpu", "--sbatch", "exclude=node7", "--log-dir", str(logs),
                                    "-m", "trainers.cifar", "--config", "configs/cifar_debug.yaml",
                                    "optim.lr=0.1,0.2"), cwd=REPO)
    assert result.returncode == 0, result.stderr
    script = result.stdout.replace(sys.executable, "<python>").replace(str(logs), "<logs>").replace(str(REPO), "<repo>")
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text(), f"dry-run script changed (UPDATE_GOLDEN=1 rewrites the file):\n{script}"
    assert not logs.exists(), "a dry run submits nothing and writes nothing"


def test_submit_refuses_a_bad_key_before_queueing_anything(tmp_path: Path) -> None:
    result = run_command(submit_cmd("--local", "--log-dir", str(tmp_path / "logs"), "-m", "trainers.cifar", "--config",
                                    str(DEBUG_CONFIG), "optim.lrr=0.1"), cwd=tmp_path)
    assert result.returncode == 2
    assert "nothing was submitted" in result.stderr and "did you mean 'optim.lr'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "logs").exists() and not (tmp_path / "runs").exists()
    late = run_command(submit_cmd("-m", "trainers.cifar", "train.epochs=1", "--time", "5"), cwd=tmp_path)
    assert late.returncode == 2 and "before -m" in late.stderr, late.stderr


def test_submit_help_lists_every_flag() -> None:
    out = run_command(submit_cmd("--help"), cwd=REPO).stdout
    for flag in ("--nodes", "--tasks-per-node", "--gpus-per-node", "--cpus-per-task", "--mem", "--time",
                 "--partition", "--account", "--qos", "--constraint", "--job-name", "--sbatch", "--local",
                 "--dry-run", "--wait", "-m MODULE", "--config"):
        assert flag in out, f"{flag} missing from submit --help:\n{out}"
    assert "submit" in run_command([sys.executable, "-m", "launcher", "--help"], cwd=REPO).stdout


# ------------------------------------------------------------------------ local executor jobs


@pytest.mark.parametrize("task, name", [(["trainers.cifar", "--config", str(DEBUG_CONFIG)], "cifar-debug"),
                                        (["trainers.lm", "--config", str(REPO / "configs" / "lm_debug.yaml"),
                                          "data.synthetic_bytes=20000", "train.max_steps=6", "dist.strategy=fsdp"],
                                         "lm-debug")],
                         ids=["cifar", "lm-fsdp"])
def test_local_two_ranks_complete_and_report_the_run_directory(tmp_path: Path, task: list[str], name: str) -> None:
    result = run_command(submit_cmd("--local", "--tasks-per-node", "2", "--wait", "-m", *task, "run.progress=lines"),
                         cwd=tmp_path, timeout=300, env=job_environ())
    assert result.returncode == 0, result.stdout + result.stderr
    run_dirs = list((tmp_path / "runs").glob(f"{name}-*"))
    assert len(run_dirs) == 1 and str(run_dirs[0]) in result.stdout, result.stdout
    start = records(run_dirs[0], "start")
    assert start and start[0]["world_size"] == 2 and start[0]["launcher"] == "submitit", start
    assert (run_dirs[0] / "model.pt").is_file()
    if "dist.strategy=fsdp" in task:  # sharded: one checkpoint folder written by both ranks
        assert (run_dirs[0] / "checkpoints" / "step-00000006" / "__1_0.distcp").is_file()


def test_local_job_stopped_by_submitits_signal_requeues_and_matches(tmp_path: Path,
                                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    """USR2 (submitit's preemption / time-limit signal) mid-run: the trainer checkpoints, submitit requeues,
    the job resumes at the next unseen batch and ends with the weights of an uninterrupted job."""
    common = ["--local", "--tasks-per-node", "2", "--time", "10", "--wait", "-m", "trainers.cifar", "--config",
              str(DEBUG_CONFIG), *LONG]
    straight = straight_long_run(tmp_path_factory)

    run_dir = tmp_path / "stopped"
    proc, job = start_submit([*common, f"run.dir={run_dir}"], tmp_path, tmp_path / "submit.log")
    wait_for(lambda: bool(records(run_dir, "train")), 120, "the first training step", poll=0.02)
    _signal_tasks(int(job), signal.SIGUSR2, 2)
    assert wait_all([proc], 300, log_file=tmp_path / "submit.log") == [0], (tmp_path / "submit.log").read_text()

    log = next((tmp_path / "runs" / "submitit").glob(f"{job}/*_0_log.out")).read_text()
    assert "Stop signal received: checkpoint written" in log and "Requeued job" in log, log[-3000:]
    starts = records(run_dir, "start")
    assert len(starts) == 2 and starts[1]["resumed"] and starts[1]["step"] > 0, starts
    assert_every_step_once(run_dir, LONG_STEPS)
    assert_same_weights(run_dir, straight)


def test_time_limit_requeues_are_capped(tmp_path: Path) -> None:
    """With --max-timeout-requeues 0 the time-limit signal ends the job (checkpoint kept) instead of a requeue."""
    run_dir = tmp_path / "capped"
    proc, job = start_submit(["--local", "--time", "10", "--max-timeout-requeues", "0", "--wait", "-m",
                              "trainers.cifar", "--config", str(DEBUG_CONFIG), *LONG, f"run.dir={run_dir}"],
                             tmp_path, tmp_path / "submit.log")
    wait_for(lambda: bool(records(run_dir, "train")), 120, "the first training step", poll=0.02)
    _signal_tasks(int(job), signal.SIGUSR2, 1)
    assert wait_all([proc], 300, log_file=tmp_path / "submit.log") != [0]
    log = next((tmp_path / "runs" / "submitit").glob(f"{job}/*_0_log.out")).read_text()
    assert "timed-out too many times" in log, log[-3000:]
    assert len(records(run_dir, "start")) == 1
    assert list((run_dir / "checkpoints").glob("step-*.pt")), "the stop checkpoint is kept"


def test_signal_before_the_trainer_starts_is_handled_by_submitit_and_requeues(tmp_path: Path) -> None:
    """A signal that arrives before the trainer installed its handlers finds submitit's own, which requeues
    the job; the requeued job trains to the end."""
    gate = tmp_path / "gate"
    run_dir = tmp_path / "gated"
    env = {**job_environ(), GATE_VARIABLE: str(gate)}
    proc = subprocess.Popen(
        submit_cmd("--local", "--time", "10", "--wait", "--log-dir", str(tmp_path / "logs"), "-m", "tests.gated_task", "--config", str(DEBUG_CONFIG),
                   "run.progress=lines", f"run.dir={run_dir}"),
        cwd=REPO, env=env, stdout=open(tmp_path / "submit.log", "w"), stderr=subprocess.STDOUT)
    wait_for(gate.with_suffix(".ready").exists, 120, "the job to reach its gate", poll=0.05)
    first = int(gate.with_suffix(".ready").read_text())
    os.kill(first, signal.SIGUSR2)
    wait_for(lambda: not _alive(first), 60, "submitit's handler to end the first attempt", poll=0.05)
    gate.with_suffix(".go").write_text("")
    assert wait_all([proc], 300, log_file=tmp_path / "submit.log") == [0], (tmp_path / "submit.log").read_text()
    assert int(gate.with_suffix(".ready").read_text()) != first, "the job was not started again"
    assert (run_dir / "model.pt").is_file()
    assert len(records(run_dir, "start")) == 1  # the first attempt never reached the trainer


def test_train_job_hands_the_signal_to_the_handler_it_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hand-over itself: after a stop, the handler that was installed before (submitit's) is called with
    the signal that stopped the run, and the task ends without a result."""
    import launcher.signals as signals

    calls: list[int] = []
    monkeypatch.setattr(signals, "_last_received", signal.SIGUSR2)
    with pytest.raises(SystemExit) as ended:
        TrainJob._hand_over({signal.SIGUSR2: lambda s, f: calls.append(s)})
    assert calls == [signal.SIGUSR2] and ended.value.code == signals.PREEMPTED_EXIT_CODE


def test_local_job_array_one_run_directory_per_value(tmp_path: Path) -> None:
    result = run_command(submit_cmd("--local", "--wait", "-m", "trainers.cifar", "--config", str(DEBUG_CONFIG),
                                    "run.progress=quiet", "train.epochs=1", "optim.lr=0.05,0.2"),
                         cwd=tmp_path, timeout=300, env=job_environ())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "submitted 2 job(s)" in result.stdout, result.stdout
    run_dirs = sorted((tmp_path / "runs").glob("cifar-debug-*"))
    assert len(run_dirs) == 2, run_dirs
    lrs = sorted(yaml.safe_load((d / "config.yaml").read_text())["optim"]["lr"] for d in run_dirs)
    assert lrs == [0.05, 0.2]

"""End to end through the real launchers: torchrun, accelerate launch, plain python; and failure paths."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.dist_utils import PYTHON, fork_ranks, run_cli, run_command, start_ranks, wait_all, wait_for
from tests.tasks import DEBUG_CONFIG

BIN = Path(PYTHON).parent
DEBUG = ["--config", str(DEBUG_CONFIG)]


def _check_run_dir(run_dir: Path) -> None:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1], "test accuracy is reported every epoch"
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1] and all(0 <= r["data_wait"] <= 1 for r in epochs)
    assert all(r["samples_per_s"] > 0 for r in epochs)
    assert all(r["test_samples"] == 500 for r in evals)
    assert evals[-1]["test_acc"] > 0.3, "the debug run should learn the synthetic data"
    assert (run_dir / "model.pt").stat().st_size > 0
    assert f"dir: {run_dir}" in (run_dir / "config.yaml").read_text(), "the resolved config names its run dir"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.pt"))[-1] == "step-00000032.pt"


def test_torchrun_two_ranks_debug_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_command([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "trainers.cifar",
                          *DEBUG, f"run.dir={run_dir}", "run.progress=lines"], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "torchrun" in result.stdout and "2 rank(s)" in result.stdout and "gloo" in result.stdout
    assert result.stdout.count("done: test_acc") == 1, "only rank 0 prints"
    _check_run_dir(run_dir)


def test_single_process_debug_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_command([PYTHON, "-m", "trainers.cifar", *DEBUG, f"run.dir={run_dir}"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "single" in result.stdout and "none (single process)" in result.stdout
    _check_run_dir(run_dir)


def test_accelerate_launch_two_cpu_ranks(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_command([str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "trainers.cifar", *DEBUG, f"run.dir={run_dir}", "train.epochs=1"], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "accelerate" in result.stdout and "2 rank(s)" in result.stdout
    assert (run_dir / "model.pt").exists()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) to make the run dir read-only")
def test_only_rank_zero_writes(tmp_path: Path) -> None:
    """Rank 1 runs in a mount namespace where the whole test folder is read-only: any write it
    attempted (metrics, config, checkpoints, model) would fail the run."""
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", f"mount --bind -o ro {tmp_path} {tmp_path}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"mount namespaces unavailable here: {probe.stderr.strip()}")
    run_dir = tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    args = ["trainers.cifar", *DEBUG, f"run.dir={run_dir}", "checkpoint.every_steps=4"]
    procs = start_ranks(args, 2, log_dir=logs, wrap={1: ["unshare", "--mount", "sh", "-c",
                                                         f'mount --bind -o ro {tmp_path} {tmp_path} && exec "$0" "$@"']})
    codes = wait_all(procs, 300, logs)
    assert codes == [0, 0], (logs / "rank1.log").read_text()[-3000:]
    _check_run_dir(run_dir)


def test_unknown_key_is_a_clear_error() -> None:
    result = run_command([PYTHON, "-m", "trainers.cifar", *DEBUG, "train.batchsize=64"], timeout=120)
    assert result.returncode == 2
    assert "train.batchsize" in result.stderr and "train.batch_size" in result.stderr
    assert "Traceback" not in result.stderr


def test_indivisible_global_batch_is_a_clear_error(tmp_path: Path) -> None:
    result = run_command([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "trainers.cifar",
                          *DEBUG, f"run.dir={tmp_path}", "train.batch_size=127"], timeout=300)
    assert result.returncode != 0
    assert "train.batch_size=127" in result.stderr and "multiple of 2" in result.stderr


def test_missing_dataset_offline_names_the_synthetic_option(tmp_path: Path) -> None:
    result = run_cli(["trainers.cifar", *DEBUG, "data.synthetic=false", "data.download=false",
                      f"data.root={tmp_path / 'nowhere'}", f"run.dir={tmp_path / 'run'}"], timeout=120)
    assert result.returncode == 2
    assert "data.synthetic=true" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists(), "a refused run leaves no run directory (and no .lock) behind"


def test_a_stopped_rank_fails_the_job_in_bounded_time_naming_the_phase(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    args = ["trainers.cifar", *DEBUG, f"run.dir={run_dir}", "dist.timeout_s=5", "run.log_every=1",
            "data.synthetic_train_size=8192"]
    procs = fork_ranks(args, 2, logs)  # forked (see fork_ranks): the subject is the run's timeout, not its start-up
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0 or procs[0].poll() is not None, 240,
             "training to start")
    procs[1].send_signal(signal.SIGSTOP)  # alive but silent, like a hung node
    try:
        code0 = wait_all(procs[:1], 120, logs)[0]
    finally:
        procs[1].kill()
        procs[1].wait(timeout=30)
    log = (logs / "rank0.log").read_text()
    assert code0 == 3, log[-3000:]
    assert "in phase '" in log and "dist.timeout_s=5" in log


def test_determinism_switches_both_ways_and_off_imports_no_compiler() -> None:
    """run.deterministic turns torch's deterministic algorithms on and off again; a run that leaves it off (the
    default) does not import inductor for it, whose import torch's setter would add to every run's start-up."""
    probe = ("import sys, torch\nfrom launcher.runtime import configure_determinism\n"
             "configure_determinism(False)\nprint('inductor after off:', 'torch._inductor' in sys.modules)\n"
             "configure_determinism(True)\nprint('on:', torch.are_deterministic_algorithms_enabled())\n"
             "configure_determinism(False)\nprint('off again:', torch.are_deterministic_algorithms_enabled())")
    result = run_command([PYTHON, "-c", probe], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:3] == ["inductor after off: False", "on: True", "off again: False"], result.stdout

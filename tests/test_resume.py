"""Checkpoints that never lose work: exact resume after SIGTERM, kill -9 mid-save, corrupt files,
torchrun restarts, and checkpoints moving between world sizes. Real processes, gloo on CPU."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from launcher.signals import PREEMPTED_EXIT_CODE
from tests.dist_utils import PYTHON, REPO, fork_ranks, run_cli, run_ranks, wait_all, wait_for
from tests.tasks import DEBUG_CONFIG, evaluate_checkpoint, train_trace
from trainers.core.checkpoint import FORMAT, CheckpointManager

# 64 steps per epoch, 2 epochs: long enough to interrupt well inside the first epoch.
EXACT = ["data.synthetic_train_size=4096", "train.batch_size=64", "train.epochs=2", "run.log_every=1",
         "run.deterministic=true", "run.progress=lines", "checkpoint.every_epochs=1", "model.width=8",
         "train.augment=true"]  # augmentation is part of what must resume exactly


def _train_args(run_dir: Path, *extra: str) -> list[str]:
    return ["trainers.cifar", "--config", str(DEBUG_CONFIG), f"run.dir={run_dir}", *EXACT, *extra]


def _records(run_dir: Path, kind: str = "train") -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return [r for r in lines if r["kind"] == kind]


def _last_step(run_dir: Path) -> int:
    records = _records(run_dir)
    return records[-1]["step"] if records else 0


def _run_ranks_to_end(args: list[str], world: int, logs: Path, timeout: float = 300) -> list[int]:
    logs.mkdir(parents=True, exist_ok=True)
    return wait_all(fork_ranks(args, world, logs), timeout, logs)


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[str]], Path]:
    """Uninterrupted 2-rank runs by training settings, each trained once for the tests that compare with it."""
    done: dict[tuple[str, ...], Path] = {}

    def run(training: list[str]) -> Path:
        if tuple(training) not in done:
            tmp = tmp_path_factory.mktemp("straight")
            assert _run_ranks_to_end(_train_args(tmp / "run", *training), 2, tmp / "logs") == [0, 0]
            done[tuple(training)] = tmp / "run"
        return done[tuple(training)]

    return run


# When checkpoints are written changes nothing in training: the background-writes run is compared with the same
# uninterrupted run as the sync one (which also checks that writing in the background leaves the numbers alone).
@pytest.mark.parametrize("training, writes", [
    ([], []), ([], ["checkpoint.async=true", "checkpoint.every_steps=7"]),
    (["train.lookahead=true", "train.flip=alternate", "train.pad=2", "train.pad_mode=reflect",
      "eval.tta=mirror_translate", "sched.name=triangle", "sched.initial_lr=0.2", "optim.no_decay_lr_scale=4"], [])],
    ids=["sync", "background-writes", "fast-recipe-parts"])
def test_sigterm_to_one_rank_then_resume_is_bit_identical(tmp_path: Path, straight_run: Callable[[list[str]], Path],
                                                          training: list[str], writes: list[str]) -> None:
    straight, broken = straight_run(training), tmp_path / "broken"
    writes = [*training, *writes]

    logs = tmp_path / "logs-b"
    logs.mkdir()
    procs = fork_ranks(_train_args(broken, *writes), 2, logs)
    wait_for(lambda: _last_step(broken) >= 10 or any(p.poll() is not None for p in procs), 240,
             "the interrupted run to reach step 10")
    procs[1].send_signal(signal.SIGTERM)  # one rank is enough: the ranks agree at the next step
    codes = wait_all(procs, 120, logs)
    assert codes == [PREEMPTED_EXIT_CODE] * 2, (logs / "rank0.log").read_text()[-3000:]

    state, path = CheckpointManager(broken / "checkpoints").load_latest()  # type: ignore[misc]
    stopped_at = state["train_state"]["global_step"]
    assert 0 < state["train_state"]["step_in_epoch"] < 64, "the interruption must fall inside an epoch"
    assert len(state["ranks"]) == 2 and "python" in state["ranks"][1]["rng"]

    assert _run_ranks_to_end(_train_args(broken, *writes), 2, tmp_path / "logs-c") == [0, 0]
    resumed_log = (tmp_path / "logs-c" / "rank0.log").read_text()
    assert f"Resumed from {path}" in resumed_log

    a, b = _final_weights(straight), _final_weights(broken)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    after = lambda d: [(r["step"], r["loss"]) for r in _records(d) if r["step"] > stopped_at]  # noqa: E731
    assert after(straight) == after(broken) and len(after(straight)) == 128 - stopped_at
    steps = [r["step"] for r in _records(broken)]
    assert steps == list(range(1, 129)), "each step is logged exactly once across the interruption"


def test_sigkill_while_checkpoint_is_written_keeps_previous_and_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ckpt_dir = run_dir / "checkpoints"
    # ResNet-18 checkpoints (~130 MB with momentum) take long enough to write to be caught mid-write.
    args = ["trainers.cifar", "--config", str(DEBUG_CONFIG), f"run.dir={run_dir}", "model.name=resnet18",
            "model.width=64", "data.synthetic_train_size=160", "train.batch_size=16", "train.epochs=1",
            "checkpoint.every_steps=1", "run.progress=lines", "data.synthetic_test_size=16"]  # (the writes matter)
    proc = fork_ranks(args, 1, tmp_path)[0]

    def writing() -> bool:
        names = os.listdir(ckpt_dir) if ckpt_dir.is_dir() else []
        return any(n.startswith("step-") for n in names) and any(".tmp" in n for n in names)

    def frozen_mid_write() -> bool:
        """Freeze the process when it is seen writing a checkpoint after the first one. The write may
        complete between the look and the freeze, so look again while it is frozen; if it had
        completed, let it run on to the next write (one per step)."""
        if proc.poll() is not None:
            return True
        if not writing():
            return False
        proc.send_signal(signal.SIGSTOP)
        if writing():
            return True
        proc.send_signal(signal.SIGCONT)
        return False

    wait_for(frozen_mid_write, 240, "a checkpoint write after the first checkpoint", poll=0.001)
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed mid-write"
    assert any(".tmp" in n for n in os.listdir(ckpt_dir)), "the kill should have left a partial temp file"

    found = CheckpointManager(ckpt_dir).load_latest()
    assert found is not None
    resumed_step = found[0]["train_state"]["global_step"]
    assert resumed_step >= 1

    result = run_cli(args, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"at epoch 0, step {resumed_step}" in result.stdout
    assert not any(".tmp" in n for n in os.listdir(ckpt_dir)), "stale temp files are cleaned up"
    assert (run_dir / "model.pt").exists()


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    base = ["trainers.cifar", "--config", str(DEBUG_CONFIG), f"run.dir={run_dir}", "run.progress=lines",
            "checkpoint.keep_last=5"]
    first = run_cli(base, timeout=300)
    assert first.returncode == 0, first.stderr
    newest = run_dir / "checkpoints" / "step-00000032.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk or a lost node

    again = run_cli([*base, "train.epochs=3"], timeout=300)
    assert again.returncode == 0, again.stderr
    assert "step-00000032.pt is unusable" in again.stdout
    assert "at epoch 1, step 16" in again.stdout  # the previous, epoch-0 checkpoint
    records = _records(run_dir)
    assert [r["step"] for r in records] == sorted({r["step"] for r in records}), "no duplicated steps"


def test_all_checkpoints_corrupt_is_a_clear_error_and_keeps_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    base = ["trainers.cifar", "--config", str(DEBUG_CONFIG), f"run.dir={run_dir}", "run.progress=quiet"]
    assert run_cli(base, timeout=300).returncode == 0
    files = sorted((run_dir / "checkpoints").glob("step-*.pt"))
    for f in files:
        f.write_bytes(b"garbage")
    again = run_cli([*base, "train.epochs=3"], timeout=300)  # continue it: a resume is needed
    assert again.returncode == 2
    assert "checkpoint.resume" in again.stderr
    assert sorted((run_dir / "checkpoints").glob("step-*.pt")) == files, "nothing saved before is deleted"


@pytest.mark.timeout(600)
def test_torchrun_max_restarts_recovers_from_a_killed_rank(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "-m", *_train_args(run_dir, "checkpoint.every_steps=5", "run.deterministic=false", "train.epochs=1")]
    log = (tmp_path / "torchrun.log").open("w")
    agent = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log,
                             stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _last_step(run_dir) >= 12 or agent.poll() is not None, 200, "step 12")
        workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, f"expected 2 workers under torchrun, found {workers}"
        os.kill(int(workers[1]), signal.SIGKILL)
        code = wait_all([agent], 240, logs=None, log_file=tmp_path / "torchrun.log")[0]
    finally:
        if agent.poll() is None:
            agent.kill()
    output = (tmp_path / "torchrun.log").read_text()
    assert code == 0, output[-4000:]
    assert "Resumed from" in output
    steps = [r["step"] for r in _records(run_dir)]
    assert steps == list(range(1, 65)), "the restarted group redid the lost steps once and finished"
    final = CheckpointManager(run_dir / "checkpoints").load_latest()
    assert final is not None and final[0]["train_state"]["global_step"] == 64


@pytest.mark.parametrize("saved_world,loaded_world", [(2, 1), (1, 2)])
def test_checkpoint_moves_between_world_sizes(tmp_path: Path, saved_world: int, loaded_world: int) -> None:
    run_dir = tmp_path / "run"
    args = ["trainers.cifar", "--config", str(DEBUG_CONFIG), f"run.dir={run_dir}", "run.progress=quiet",
            "train.epochs=1"]
    assert _run_ranks_to_end(args, saved_world, tmp_path / "logs") == [0] * saved_world
    ckpt = CheckpointManager(run_dir / "checkpoints").latest_path()
    assert ckpt is not None
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in torch.load(ckpt, weights_only=True)["model"])
    saved_acc = _records(run_dir, "eval")[-1]["test_acc"]
    results = run_ranks(evaluate_checkpoint, loaded_world, str(ckpt), str(tmp_path / "eval"))
    for r in results:
        assert r["test_acc"] == saved_acc and r["test_samples"] == 500


GOLDEN = REPO / "tests" / "golden" / "checkpoint-format1-step6.pt"  #: a checkpoint of format 1
#: The settings GOLDEN was written with (by the toolkit before the Checkpointer,
#: format 1: per-rank "window"/"window_steps", no format number), 2 epochs of 4 steps, stopped at step 6.
FORMAT1 = ["data.synthetic_train_size=256", "data.synthetic_test_size=64", "train.batch_size=64", "train.epochs=2",
           "model.width=4", "checkpoint.every_steps=2", "checkpoint.keep_last=10", "run.deterministic=true",
           "run.progress=lines"]


def test_a_checkpoint_of_an_earlier_format_resumes_exactly(tmp_path: Path) -> None:
    straight, old, today = tmp_path / "straight", tmp_path / "old", tmp_path / "today"
    run = ["trainers.cifar", "--config", str(DEBUG_CONFIG), *FORMAT1]
    assert run_cli([*run, f"run.dir={straight}"], timeout=300).returncode == 0
    golden = torch.load(GOLDEN, weights_only=False)
    # The golden weights and momenta were computed on another CPU, whose kernels round differently (1e-7 apart
    # here), so the reference is today's own step-6 checkpoint carrying the golden's tensors: what the old format
    # must restore exactly beside them (RNG streams, data position, schedule) is the same on every machine.
    reference = torch.load(straight / "checkpoints" / "step-00000006.pt", weights_only=False)
    reference["model"], reference["optimizer"] = golden["model"], golden["optimizer"]
    for run_dir in (old, today):
        (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(GOLDEN, old / "checkpoints" / "step-00000006.pt")
    torch.save(reference, today / "checkpoints" / "step-00000006.pt")
    for run_dir in (old, today):
        resumed = run_cli([*run, f"run.dir={run_dir}"], timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "Resumed from" in resumed.stdout and "step 6 (2 steps into the epoch)" in resumed.stdout
    a, b = _final_weights(today), _final_weights(old)
    assert all(torch.equal(a[k], b[k]) for k in a), "resuming the old checkpoint must give today's format's weights"
    state, _ = CheckpointManager(old / "checkpoints").load_latest()  # type: ignore[misc]
    assert state["format"] == FORMAT and set(state["ranks"][0]) == {"rng", "losses"}, "new saves use today's format"


def test_a_learning_rate_changed_on_resume_takes_effect_on_the_same_schedule(tmp_path: Path) -> None:
    """optim.lr changed when resuming a finished epoch (and train.epochs raised): from the resumed step on, the
    learning rates are those of a run that had the new value from the start; the checkpoint's lr does not come
    back. (A resume with the same config is left untouched: the bit-identical tests above.)"""
    common = ["run.log_every=1", "checkpoint.resume=auto", "model.width=8"]
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    run_ranks(train_trace, 1, "cifar", [*common, "train.epochs=1", "optim.lr=0.2"], str(resumed))
    run_ranks(train_trace, 1, "cifar", [*common, "train.epochs=2", "optim.lr=0.01"], str(resumed))
    run_ranks(train_trace, 1, "cifar", [*common, "train.epochs=2", "optim.lr=0.01"], str(straight))
    assert [r["kind"] for r in _records(resumed, "start")] == ["start", "start"]
    after = {r["step"]: r["lr"] for r in _records(resumed) if r["step"] > 16}
    expected = {r["step"]: r["lr"] for r in _records(straight) if r["step"] > 16}
    assert list(after) == list(range(17, 33)) and after == pytest.approx(expected, rel=1e-6, abs=1e-12), after


def test_time_based_checkpoints_are_agreed_by_every_rank(tmp_path: Path) -> None:
    """checkpoint.every_minutes alone (no epoch or step interval): the ranks agree on the step to save at, at
    their stop agreements; a disagreement would leave a rank in the save's collectives and fail the run."""
    run_dir = tmp_path / "run"
    args = ["trainers.cifar", "--config", str(DEBUG_CONFIG), f"run.dir={run_dir}", "model.width=8", "train.epochs=1",
            "data.synthetic_train_size=16384", "checkpoint.every_epochs=0", "checkpoint.every_minutes=0.001",
            "checkpoint.keep_last=1000", "checkpoint.keep_best=false", "run.progress=lines"]
    assert _run_ranks_to_end(args, 2, tmp_path / "logs") == [0, 0]
    steps = sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.pt"))
    # 128 steps of about 10 ms; a save is due 0.06 s after the previous one, at the next agreement (~0.2 s)
    assert steps[-1] == 128 and steps[0] < 128, f"expected time-based saves during the epoch, got {steps}"

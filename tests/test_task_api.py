"""The trainer as a library: a user's own task (dict samples, loss, metric, AdamW, config keys, state)
gets exact data parallelism, exact evaluation and exact resume without editing the toolkit."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from launcher.signals import PREEMPTED_EXIT_CODE
from tests.dist_utils import PYTHON, REPO, fork_ranks, run_command, run_ranks, wait_all, wait_for
from tests.tasks import evaluate_initial, train_trace, workers_alive_after_fit
from trainers.core.checkpoint import CheckpointManager

BIN = Path(PYTHON).parent
STEPS = 6


def test_example_dict_samples_custom_loss_adamw_two_ranks_match_one_process(tmp_path: Path) -> None:
    common = [f"train.max_steps={STEPS}", "train.batch_size=32", "data.train_size=256", "checkpoint.every_epochs=0",
              "data.noise=0.3"]  # noisy targets: the per-sample random draws must match across world sizes
    one = run_ranks(train_trace, 1, "waves", common, str(tmp_path / "one"))[0]
    two = run_ranks(train_trace, 2, "waves", [*common, "train.grad_accum=2"], str(tmp_path / "two"))
    assert len(one) == len(two[0]) == STEPS
    for step in range(STEPS):
        assert torch.equal(two[0][step], two[1][step]), f"ranks differ after step {step + 1}"
        torch.testing.assert_close(two[0][step], one[step], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"after step {step + 1}: {m}")
    assert not torch.equal(one[0], one[-1]), "parameters did not change: the comparison would be vacuous"


def test_exact_evaluation_of_a_custom_metric_at_world_sizes_1_2_3(tmp_path: Path) -> None:
    overrides = ["data.eval_size=1001", "eval.batch_size=96", "train.batch_size=120"]  # 1001 = 7 x 11 x 13: no world size divides it
    results = {w: run_ranks(evaluate_initial, w, overrides, str(tmp_path / f"w{w}"), "waves") for w in (1, 2, 3)}
    reference = results[1][0]
    assert reference["test_samples"] == 1001 and reference["test_mae"] > 0
    for world, per_rank in results.items():
        for r in per_rank:
            assert r["test_samples"] == 1001, f"world {world}: counted {r['test_samples']} samples"
            # Other batch shapes round fp32 outputs differently (~1e-8); one padded duplicate among 1001
            # samples would move the mean by ~1e-3.
            assert r["test_mae"] == pytest.approx(reference["test_mae"], rel=1e-6)
            assert r["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-6)


def test_example_runs_as_a_script_under_torchrun(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_command([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "examples/custom_task.py",
                          f"run.dir={run_dir}", "run.progress=lines", "train.epochs=6", "data.train_size=1024"],
                         timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 rank(s)" in result.stdout and "waves" in result.stdout
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert len(evals) == 6 and evals[-1]["test_samples"] == 1001
    assert evals[-1]["test_mae"] < 0.5 * evals[0]["test_mae"], "the example should learn its curve"
    manifest = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())
    best = max(manifest["checkpoints"], key=lambda e: e["metric"])
    assert best["metric"] == pytest.approx(-min(e["test_mae"] for e in evals)), "lowest MAE is the best checkpoint"


def test_dataloader_workers_are_stopped_when_fit_returns(tmp_path: Path) -> None:
    """Persistent workers outlive each epoch; fit() stops them itself. Left to the garbage collector they were joined
    only after a 5 s timeout each, at every 2-rank run's exit (their queues' threads were gone by then)."""
    overrides = ["data.loader=dataloader", "data.num_workers=2", "train.epochs=1", "data.synthetic_train_size=512"]
    assert run_ranks(workers_alive_after_fit, 2, overrides, str(tmp_path / "run")) == [0, 0]


# --------------------------------------------------------------------------- exact resume, DataLoader workers

RESUME = ["train.batch_size=32", "train.epochs=2", "data.num_workers=2", "run.log_every=1", "run.deterministic=true",
          "run.progress=lines", "data.train_size=640", "optim.lr=0.05"]  # 20 steps per epoch


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}") and '"train"' in line]


def _run(run_dir: Path, logs: Path) -> list[int]:
    logs.mkdir(parents=True, exist_ok=True)
    return wait_all(fork_ranks(["tests.augmented_task", f"run.dir={run_dir}", *RESUME], 2, logs), 240, logs)


def test_own_keys_own_state_and_worker_transforms_resume_bit_exactly(tmp_path: Path) -> None:
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert _run(straight, tmp_path / "logs-a") == [0, 0]

    logs = tmp_path / "logs-b"
    logs.mkdir()
    procs = fork_ranks(["tests.augmented_task", f"run.dir={broken}", *RESUME], 2, logs)
    wait_for(lambda: len(_records(broken)) >= 7 or any(p.poll() is not None for p in procs), 200, "step 7")
    procs[0].send_signal(signal.SIGTERM)
    assert wait_all(procs, 120, logs) == [PREEMPTED_EXIT_CODE] * 2, (logs / "rank0.log").read_text()[-3000:]
    state, _ = CheckpointManager(broken / "checkpoints").load_latest()  # type: ignore[misc]
    stopped = state["train_state"]["global_step"]
    assert 0 < state["train_state"]["step_in_epoch"] < 20, "the interruption must fall inside an epoch"
    assert state["task.micro_steps"] == {"count": stopped}, "the task's own state is in the checkpoint"

    assert _run(broken, tmp_path / "logs-c") == [0, 0]
    a = torch.load(straight / "model.pt", weights_only=True)
    b = torch.load(broken / "model.pt", weights_only=True)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    assert [(r["step"], r["loss"]) for r in _records(straight)] == [(r["step"], r["loss"]) for r in _records(broken)]
    final = CheckpointManager(broken / "checkpoints").load_latest()[0]  # type: ignore[index]
    assert final["task.micro_steps"] == {"count": 40}, "restored, then counted on: every micro-step once"


def test_a_bug_in_task_code_is_shown_once_from_the_users_frame(tmp_path: Path) -> None:
    """A bug in the task's own loss: one traceback, starting at the user's frame (the toolkit's loop above it is
    left out). Under torchrun it is in torchrun's failure summary (rank 0's in full, the others' last frame), and
    each rank prints one line; with plain python the process prints it."""
    debug = ["--config", str(REPO / "configs" / "cifar_debug.yaml")]
    two = run_command([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "tests.buggy_task", *debug,
                       f"run.dir={tmp_path / 'a'}"], timeout=300, env={"BUG": "loss"})
    assert two.returncode != 0
    assert two.stderr.count(", in loss\n") == 1, two.stderr[-4000:]  # rank 0's traceback, once
    assert "trainers/core/trainer.py" not in two.stderr, "the toolkit's own frames are trimmed"
    assert "error: ZeroDivisionError: division by zero (the traceback is in torchrun's failure summary)" in two.stderr
    one = run_command([PYTHON, "-m", "tests.buggy_task", *debug, f"run.dir={tmp_path / 'b'}"], timeout=300,
                      env={"BUG": "loss"})
    assert one.returncode == 1 and one.stderr.startswith("Traceback (most recent call last):\n  File ")
    first_frame = one.stderr.splitlines()[1]
    assert "tests/buggy_task.py" in first_frame and "in loss" in first_frame, one.stderr[-3000:]
    assert one.stderr.rstrip().endswith("ZeroDivisionError: division by zero")


def test_a_task_that_does_not_name_its_config_is_told_to(tmp_path: Path) -> None:
    result = run_command([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "tests.buggy_task",
                          f"run.dir={tmp_path / 'run'}", "train.epochs=1"], timeout=300, env={"BUG": "config"})
    ours = [line for line in result.stderr.splitlines() if line.startswith(("error:", "rank 1: error:"))]
    assert len(ours) == 1 and "'train.lookahead'" in ours[0] and "`config = YourConfig`" in ours[0], result.stderr
    assert "MissingKey: The task reads 'train.lookahead'" in result.stderr, "torchrun's summary names the cause"
    assert not (tmp_path / "run").exists()

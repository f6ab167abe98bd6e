"""A loss that becomes NaN or infinite: every rank stops at the same step (exit 4) naming the step and the last
good checkpoint, nothing is saved from the broken state, and train.nonfinite=skip drops such steps (a bounded
number in a row). Real processes, CPU."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from tests.dist_utils import fork_ranks, run_cli, wait_all
from tests.tasks import DEBUG_CONFIG
from trainers.core.checkpoint import CheckpointManager
from trainers.core.nonfinite import DIVERGED_EXIT_CODE

QUICK = ["--config", str(DEBUG_CONFIG), "train.epochs=1", "run.progress=lines", "model.width=8"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_diverging_run_stops_every_rank_and_keeps_its_good_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    good = run_cli(["tests.nan_task", *QUICK, f"run.dir={run_dir}"], timeout=300)
    assert good.returncode == 0, good.stderr[-3000:]
    model, checkpoints = run_dir / "model.pt", run_dir / "checkpoints"
    model_digest = _digest(model)

    # The same run continued for 2 more epochs, keeping only the newest checkpoint (every 2 steps); the 3rd step
    # after the resume (global step 19) gets NaN inputs, so its loss and every weight after it are NaN.
    args = ["tests.nan_task", *QUICK, f"run.dir={run_dir}", "train.epochs=3", "checkpoint.keep_last=1",
            "checkpoint.every_steps=2", "run.log_every=5"]
    codes = wait_all(fork_ranks(args, 2, tmp_path, env={"NAN_STEPS": "3"}), 240, tmp_path)
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [DIVERGED_EXIT_CODE] * 2, logs[0][-3000:]
    message = [line for line in logs[0].splitlines() if line.startswith("error: Training diverged")]
    assert len(message) == 1 and "step-00000018.pt" in message[0], logs[0][-2000:]
    # Noticed where the ranks next compare notes: the stop agreement, which runs about every 0.2 s of training (every
    # step when steps are slow, as under load), or the log line of step 20, whichever comes first; never later.
    assert re.findall(r"noticed at step (\d+)", message[0]) in (["19"], ["20"]), message[0]
    assert "Training diverged" not in logs[1], "every rank stops; rank 0 alone says why"
    assert "changed since the last run: train.epochs: 1 -> 3" in logs[0], "a resume names what changed"
    # step 16 stays as the best (the only evaluated one), step 18 as the newest; nothing after the NaN
    assert sorted(p.name for p in checkpoints.glob("step-*.pt")) == ["step-00000016.pt", "step-00000018.pt"]
    assert _digest(model) == model_digest, "model.pt still holds the good weights"
    state, path = CheckpointManager(checkpoints).load_latest()  # type: ignore[misc]
    assert path.name == "step-00000018.pt" and all(torch.isfinite(v).all() for v in state["model"].values())


def test_skip_drops_the_non_finite_steps_and_finishes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(["tests.nan_task", *QUICK, "train.nonfinite=skip", f"run.dir={run_dir}", "run.log_every=1"],
                     timeout=300, env={"NAN_STEPS": "3,4"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "step 3: non-finite loss or gradients; step skipped (1 in a row" in result.stdout
    assert "step 4: non-finite loss or gradients; step skipped (2 in a row" in result.stdout
    weights = torch.load(run_dir / "model.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_stop_is_the_default_for_the_same_steps(tmp_path: Path) -> None:
    result = run_cli(["tests.nan_task", *QUICK, f"run.dir={tmp_path / 'run'}", "run.log_every=50"], timeout=300,
                     env={"NAN_STEPS": "3"})
    assert result.returncode == DIVERGED_EXIT_CODE, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Training diverged" in result.stderr and "No checkpoint was written before it" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "model.pt").exists()


def test_skip_gives_up_after_too_many_in_a_row(tmp_path: Path) -> None:
    result = run_cli(["trainers.cifar", *QUICK, "optim.lr=1e8", "train.nonfinite=skip", "train.nonfinite_skips=3",
                      f"run.dir={tmp_path / 'run'}"], timeout=300)
    assert result.returncode == DIVERGED_EXIT_CODE, result.stdout[-2000:] + result.stderr[-2000:]
    assert "3 steps in a row had non-finite gradients (train.nonfinite_skips=3)" in result.stderr

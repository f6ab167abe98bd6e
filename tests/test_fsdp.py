"""Sharded training (dist.strategy=fsdp, FSDP2 on gloo CPU ranks) with the promises of DDP: the same steps as one
process and as DDP, a bit-identical resume, resume at another world size without a sample skipped or repeated,
fallback past a damaged sharded checkpoint, an export that loads into a plain model, and the memory it saves."""

from __future__ import annotations

import json
import signal
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from launcher.export import export
from launcher.signals import PREEMPTED_EXIT_CODE
from tests.dist_utils import PYTHON, REPO, fork_ranks, run_cli, run_command, run_ranks, wait_all, wait_for
from tests.tasks import LM_SMALL, evaluate_initial, shard_bytes, train_trace

CONFIG = ["--config", str(REPO / "configs" / "lm_debug.yaml")]
SMALL = [*LM_SMALL, "sample.tokens=0"]
FSDP = "dist.strategy=fsdp"


def _records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{what}: {m}")


def test_fsdp_steps_like_one_process_and_like_ddp_with_sgd_and_accumulation(tmp_path: Path) -> None:
    """SGD, not Adam (Adam's normalisation hides a wrongly scaled gradient); two micro-batches per step exercise
    the deferred reduce-scatter; recomputed activations change nothing. Tolerance: float reassociation only
    (rtol 1e-4, atol 1e-6)."""
    common = [*SMALL, "optim.name=sgd", "optim.lr=0.5", "train.grad_accum=2", "train.max_steps=5",
              "checkpoint.every_epochs=0"]
    one = run_ranks(train_trace, 1, "lm", common, str(tmp_path / "one"))[0]
    ddp = run_ranks(train_trace, 2, "lm", common, str(tmp_path / "ddp"))[0]
    fsdp = run_ranks(train_trace, 2, "lm", [*common, FSDP], str(tmp_path / "fsdp"))
    recomputed = run_ranks(train_trace, 2, "lm", [*common, FSDP, "model.activation_checkpointing=true"],
                           str(tmp_path / "recomputed"))[0]
    assert len(one) == len(fsdp[0]) == len(recomputed) == 5
    for step, (f, r) in enumerate(zip(fsdp[0], recomputed), start=1):
        _close(r, f, f"activation checkpointing vs without, after step {step}")
    assert all(torch.equal(a, b) for a, b in zip(fsdp[0], fsdp[1])), "the ranks gathered different weights"
    for step, (f, o, d) in enumerate(zip(fsdp[0], one, ddp), start=1):
        _close(f, o, f"fsdp vs one process after step {step}")
        _close(f, d, f"fsdp vs ddp after step {step}")
    assert not torch.equal(one[0], one[-1])


def test_an_image_model_with_batchnorm_shards_by_its_top_level_parts_and_trains_like_ddp(tmp_path: Path) -> None:
    """CIFAR's CNN under the default units (its top-level parts), channels_last inputs, BatchNorm buffers kept
    per rank as under DDP without SyncBN."""
    common = ["train.max_steps=4", "checkpoint.every_epochs=0", "optim.lr=0.05"]
    ddp = run_ranks(train_trace, 2, "cifar", common, str(tmp_path / "ddp"))[0]
    fsdp = run_ranks(train_trace, 2, "cifar", [*common, FSDP], str(tmp_path / "fsdp"))[0]
    for step, (f, d) in enumerate(zip(fsdp, ddp), start=1):
        _close(f, d, f"fsdp vs ddp after step {step}")


def test_each_rank_holds_at_most_0_55_of_a_ddp_rank_in_weights_gradients_and_optimizer_state(tmp_path: Path) -> None:
    common = [*SMALL, "model.width=64", "train.max_steps=1", "checkpoint.every_epochs=0"]
    ddp = run_ranks(shard_bytes, 2, "lm", common, str(tmp_path / "ddp"))
    fsdp = run_ranks(shard_bytes, 2, "lm", [*common, FSDP], str(tmp_path / "fsdp"))
    for rank in range(2):
        ratio = fsdp[rank]["total"] / ddp[rank]["total"]
        assert ratio <= 0.55, f"rank {rank}: {fsdp[rank]} vs DDP {ddp[rank]} ({ratio:.3f})"
        assert fsdp[rank]["optimizer"] > 0 and fsdp[rank]["gradients"] > 0


def _ledger(run_dir: Path) -> dict[int, list[int]]:
    """Global step -> the sorted sample indices all ranks trained on in it (a step logged twice on one rank
    would be a repeated step, and fails)."""
    steps: dict[int, list[int]] = defaultdict(list)
    for path in sorted(run_dir.glob("ledger-rank*.txt")):
        seen = set()
        for line in path.read_text().splitlines():
            step, indices = line.split(" ")
            assert step not in seen, f"{path.name}: step {step} trained twice"
            seen.add(step)
            steps[int(step)] += [int(i) for i in indices.split(",")]
    return {k: sorted(v) for k, v in steps.items()}


ARGS = ["tests.ledger_lm", *CONFIG, *SMALL, "train.epochs=2", "run.log_every=1", "run.deterministic=true",
        "run.progress=lines"]


def _interrupt(run_dir: Path, world: int, strategy: str, tmp_path: Path, at_step: int = 8) -> None:
    procs = fork_ranks([*ARGS, strategy, f"run.dir={run_dir}"], world, tmp_path)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count('"train"') >= at_step
             or procs[0].poll() is not None, 240, f"step {at_step}")
    procs[0].send_signal(signal.SIGTERM)
    assert wait_all(procs, 120, tmp_path) == [PREEMPTED_EXIT_CODE] * world


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted sharded run at 2 ranks: the reference of the resume tests (several read it)."""
    tmp = tmp_path_factory.mktemp("straight")
    assert wait_all(fork_ranks([*ARGS, FSDP, f"run.dir={tmp / 'run'}"], 2, tmp), 300, tmp) == [0, 0]
    return tmp / "run"


@pytest.mark.parametrize("writing", [[], ["checkpoint.async=true", "checkpoint.every_steps=3"]], ids=["sync", "async"])
def test_sigterm_then_resume_at_the_same_world_size_is_bit_identical(straight: Path, tmp_path: Path,
                                                                     writing: list[str]) -> None:
    """Async: DCP writes every few steps in the background (on a gloo group of its own) while training goes on."""
    broken = tmp_path / "broken"
    procs = fork_ranks([*ARGS, FSDP, *writing, f"run.dir={broken}"], 2, tmp_path)
    metrics = broken / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count('"train"') >= 8 or procs[0].poll() is not None,
             240, "step 8")
    procs[0].send_signal(signal.SIGTERM)
    assert wait_all(procs, 120, tmp_path) == [PREEMPTED_EXIT_CODE] * 2
    assert [p.name for p in (broken / "checkpoints").iterdir() if p.name.startswith("step-")], "no sharded checkpoint"
    assert wait_all(fork_ranks([*ARGS, FSDP, *writing, f"run.dir={broken}"], 2, tmp_path), 300,
                    tmp_path) == [0, 0]
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (straight, broken))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    losses = [[(r["step"], r["loss"]) for r in _records(d, "train")] for d in (straight, broken)]
    assert losses[0] == losses[1], "the same losses, each step logged once"
    assert _ledger(broken) == _ledger(straight)


@pytest.mark.parametrize("before, after, strategy", [(2, 1, FSDP), (1, 2, FSDP), (2, 1, "dist.strategy=ddp")],
                         ids=["fsdp-2-to-1", "fsdp-1-to-2", "ddp-2-to-1"])
def test_resume_at_another_world_size_continues_every_step_with_the_same_samples(
        straight: Path, tmp_path: Path, before: int, after: int, strategy: str) -> None:
    """The reference is the sharded run: the samples of each step do not depend on the strategy either."""
    run_dir = tmp_path / "run"
    _interrupt(run_dir, before, strategy, tmp_path)
    result = wait_all(fork_ranks([*ARGS, strategy, f"run.dir={run_dir}"], after, tmp_path), 300, tmp_path)
    assert result == [0] * after
    log = (tmp_path / "rank0.log").read_text()
    assert f"Resumed at {after} rank{'s' if after > 1 else ''} from a checkpoint written by {before}." in log, log[-3000:]
    reference, resumed = _ledger(straight), _ledger(run_dir)
    assert sorted(resumed) == sorted(reference), "steps missing or extra"
    for step in reference:
        assert resumed[step] == reference[step], f"step {step} trained other samples"
    # The loss continues where it was: the same values up to float reassociation between world sizes.
    expected = {r["step"]: r["loss"] for r in _records(straight, "train")}
    for r in _records(run_dir, "train"):
        assert r["loss"] == pytest.approx(expected[r["step"]], rel=2e-3), f"step {r['step']}"
    assert _records(run_dir, "end")[-1]["test_loss"] == pytest.approx(_records(straight, "end")[-1]["test_loss"],
                                                                       rel=2e-3)


def test_resume_at_a_world_size_the_global_batch_does_not_divide_names_the_values_that_work(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _interrupt(run_dir, 2, FSDP, tmp_path)
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    result = wait_all(fork_ranks([*ARGS, FSDP, f"run.dir={run_dir}"], 3, tmp_path), 120, tmp_path)
    assert result == [2, 2, 2]
    log = (tmp_path / "rank0.log").read_text()
    assert "train.batch_size=16 (the global batch) does not divide into 3 ranks" in log and "15 or 18" in log, log
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == saved, "nothing saved is lost"


def test_a_damaged_newest_sharded_checkpoint_falls_back_to_the_previous(straight: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _interrupt(run_dir, 2, FSDP, tmp_path, at_step=40)  # past the first epoch's checkpoint (step 35)
    folders = sorted(p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert len(folders) == 2, folders
    shard = next(folders[-1].glob("__1_*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a copy cut short
    assert wait_all(fork_ranks([*ARGS, FSDP, f"run.dir={run_dir}"], 2, tmp_path), 300, tmp_path) == [0, 0]
    log = (tmp_path / "rank0.log").read_text()
    assert f"{folders[-1]} is unusable" in log and f"resuming from {folders[0].name} instead" in log, log[-3000:]
    assert "Resumed from" in log and "step 35" in log
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (straight, run_dir))
    assert all(torch.equal(a[k], b[k]) for k in a), "the redone steps must give the uninterrupted weights"


def test_export_of_a_sharded_checkpoint_loads_into_a_plain_model_and_evaluates_the_same(
        straight: Path, tmp_path: Path) -> None:
    evaluation = {r["step"]: r["test_loss"] for r in _records(straight, "eval")}
    step = min(evaluation)
    exported = export(straight, step, tmp_path / "exported.pt")
    weights = torch.load(exported, weights_only=True)
    from trainers.gpt import GPT

    GPT(256, 32, 2, 32, 4, 0.0).load_state_dict(weights)  # plain keys, whole tensors: loads as is
    result = run_ranks(evaluate_initial, 1, [*SMALL, f"model.init_from={exported}"], str(tmp_path / "eval"), "lm")[0]
    assert result["test_loss"] == pytest.approx(evaluation[step], rel=1e-6)
    final = export(straight, None, tmp_path / "final.pt")
    plain = torch.load(straight / "model.pt", weights_only=True)
    assert all(torch.equal(plain[k], v) for k, v in torch.load(final, weights_only=True).items())
    wrong = run_command([PYTHON, "-m", "launcher", "export", str(straight), "--step", "3"], timeout=60)
    assert wrong.returncode == 2 and "has no checkpoint of step 3" in wrong.stderr


def test_the_other_strategy_on_the_same_run_dir_is_a_clear_error(straight: Path, tmp_path: Path) -> None:
    result = run_cli(["trainers.lm", *CONFIG, *SMALL, "train.epochs=3", f"run.dir={straight}"], timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "dist.strategy=fsdp" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("setting", ["model.sync_bn=true", "model.cpu_offload=true"])
def test_fsdp_refuses_what_it_cannot_combine_with(tmp_path: Path, setting: str) -> None:
    result = run_cli(["trainers.cifar", "--config", str(REPO / "configs" / "cifar_debug.yaml"), FSDP, setting,
                      f"run.dir={tmp_path / 'run'}"], timeout=120)
    assert result.returncode == 2 and setting in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_lm_sharded_under_torchrun(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_command([str(Path(PYTHON).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                          "-m", "trainers.lm", *CONFIG, *SMALL, FSDP, "train.max_steps=6", "sample.tokens=20",
                          f"run.dir={run_dir}", "run.progress=lines"], timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "dist.strategy         fsdp" in result.stdout and result.stdout.count("sample at step") == 1
    assert (run_dir / "checkpoints" / "step-00000006" / ".metadata").is_file()
    assert torch.load(run_dir / "model.pt", weights_only=True)["embed.weight"].shape == (256, 32)

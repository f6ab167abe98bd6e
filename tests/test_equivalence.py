"""2 gloo ranks train exactly like 1 process at the same global batch; evaluation is exact at any world size."""

from __future__ import annotations

import os

import pytest
import torch

from tests.dist_utils import run_ranks
from tests.tasks import evaluate_initial, runtime_identity, train_trace

STEPS = 6
COMMON = [f"train.max_steps={STEPS}", "data.synthetic_train_size=512", "train.batch_size=32", "model.width=8",
          "checkpoint.every_epochs=0"]


def _assert_same_trace(got: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    assert len(got) == len(ref) == STEPS
    for step, (a, b) in enumerate(zip(got, ref), start=1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"after step {step}: {m}")


def _check_ranks_identical(traces: list[list[torch.Tensor]]) -> None:
    for step in range(STEPS):
        assert torch.equal(traces[0][step], traces[1][step]), f"ranks hold different parameters after step {step + 1}"


@pytest.mark.parametrize("accum", [1, 2], ids=["no-accum", "accum2"])
def test_two_ranks_match_one_process_without_batchnorm(tmp_path, accum: int) -> None:
    one = run_ranks(train_trace, 1, "nonorm", COMMON, str(tmp_path / "one"))[0]
    two = run_ranks(train_trace, 2, "nonorm", [*COMMON, f"train.grad_accum={accum}"], str(tmp_path / "two"))
    _check_ranks_identical(two)
    _assert_same_trace(two[0], one)
    assert not torch.equal(one[0], one[-1]), "parameters did not change: the comparison would be vacuous"


def test_two_ranks_syncbn_match_one_process_batchnorm(tmp_path) -> None:
    one = run_ranks(train_trace, 1, "cifar", COMMON, str(tmp_path / "one"))[0]
    two = run_ranks(train_trace, 2, "cifar", [*COMMON, "model.sync_bn=true"], str(tmp_path / "two"))
    _check_ranks_identical(two)
    _assert_same_trace(two[0], one)


def test_two_ranks_without_syncbn_differ_from_one_process(tmp_path) -> None:
    """The SyncBN test above is meaningful: per-rank BatchNorm statistics change the result."""
    one = run_ranks(train_trace, 1, "cifar", COMMON, str(tmp_path / "one"))[0]
    two = run_ranks(train_trace, 2, "cifar", COMMON, str(tmp_path / "two"))
    _check_ranks_identical(two)
    assert not torch.allclose(two[0][-1], one[-1], rtol=1e-4, atol=1e-5)


def test_exact_evaluation_at_world_sizes_1_2_3(tmp_path) -> None:
    # 500 test samples: not divisible by 3, so a padded DistributedSampler would count duplicates.
    overrides = ["data.synthetic_test_size=500", "train.batch_size=120", "eval.batch_size=96"]
    results = {w: run_ranks(evaluate_initial, w, overrides, str(tmp_path / f"w{w}"))
               for w in (1, 2, 3)}
    reference = results[1][0]
    assert reference["test_samples"] == 500
    for world, per_rank in results.items():
        for r in per_rank:
            assert r["test_samples"] == 500, f"world {world}: counted {r['test_samples']} samples"
            assert r["test_acc"] == reference["test_acc"], f"world {world}: accuracy differs"
            assert r["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-5)


def test_ranks_see_the_environment_of_the_test_as_it_is_when_they_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_ranks forks from a server started earlier in the session: a variable set since must still reach the
    ranks, and one removed since must not."""
    run_ranks(os.getenv, 1, "HOME")  # the fork server is running from here on, whatever ran before
    monkeypatch.setenv("DISTLAUNCH_PROBE", "set after the server started")
    monkeypatch.delenv("HOME", raising=False)
    assert run_ranks(os.getenv, 2, "DISTLAUNCH_PROBE") == ["set after the server started"] * 2
    assert run_ranks(os.getenv, 1, "HOME") == [None]


def test_runtime_agreement_on_two_ranks() -> None:
    out = run_ranks(runtime_identity, 2)
    assert [o["rank"] for o in out] == [0, 1]
    assert all(o["backend"] == "gloo" and o["device"] == "cpu" and o["world"] == 2 for o in out)
    assert all(o["max"] == [1.0, 0.0] for o in out), "a flag set on rank 1 only must be seen by every rank"
    assert all(o["gathered"] == [0, 10] for o in out)


def test_device_resident_loader_trains_like_dataloader(tmp_path) -> None:
    common = [*COMMON, "train.augment=true"]
    host = run_ranks(train_trace, 1, "cifar", [*common, "data.loader=dataloader"], str(tmp_path / "host"))[0]
    resident = run_ranks(train_trace, 1, "cifar", [*common, "data.loader=device"], str(tmp_path / "dev"))[0]
    for step, (a, b) in enumerate(zip(host, resident), start=1):
        assert torch.equal(a, b), f"loaders diverge at step {step}"

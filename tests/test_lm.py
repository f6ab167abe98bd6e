"""The language-model task (trainers.lm): it learns a source of known entropy rate to near that limit, evaluates
exactly at any world size, resumes bit for bit, trains alike on 1 and 2 ranks, samples deterministically, and says
clearly what is wrong with a corpus. Real processes, gloo on CPU."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from launcher.errors import DatasetUnavailable
from launcher.signals import PREEMPTED_EXIT_CODE
from tests.dist_utils import PYTHON, REPO, fork_ranks, run_cli, run_command, run_ranks, wait_all, wait_for
from tests.tasks import LM_SMALL, evaluate_initial, train_trace
from trainers.lm import sample_command
from trainers.lm_data import MarkovSource, read_corpus

LM = ["trainers.lm", "--config", str(REPO / "configs" / "lm_debug.yaml")]  # python -m LM, or run_cli(LM)
SMALL = LM_SMALL


def _records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_it_learns_a_markov_source_to_within_0_1_nats_of_its_entropy_rate(tmp_path: Path) -> None:
    """No model can beat the entropy rate H of the source on its text: a loss near H is a sharp, failable target."""
    run_dir = tmp_path / "run"
    result = run_cli([*LM, f"run.dir={run_dir}", "run.progress=lines"], timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    entropy = MarkovSource().entropy_rate()
    end = _records(run_dir, "end")[-1]
    assert end["test_loss"] - entropy < 0.1, f"validation loss {end['test_loss']:.3f} vs entropy rate {entropy:.3f}"
    assert end["test_loss"] > entropy - 0.05, "below the entropy rate: the evaluation would be wrong"
    assert abs(end["test_bpb"] - end["test_loss"] / 0.6931471805599453) < 1e-6
    assert "sample at step" in result.stdout and (run_dir / "samples.txt").read_text().startswith("--- step")


def test_exact_evaluation_at_world_sizes_1_2_3(tmp_path: Path) -> None:
    # 19,300 bytes: 1,930 held out, whose 1,929 predicted tokens make 61 windows of 32 (the last one shorter),
    # a number that neither 2 nor 3 divides
    overrides = [*SMALL, "data.synthetic_bytes=19300", "train.batch_size=12", "eval.batch_size=12"]
    results = {w: run_ranks(evaluate_initial, w, overrides, str(tmp_path / f"w{w}"), "lm") for w in (1, 2, 3)}
    reference = results[1][0]
    windows = reference["test_samples"]
    assert windows % 2 and windows % 3, f"{windows} windows: choose a size no world size divides"
    for world, per_rank in results.items():
        for r in per_rank:
            assert r["test_samples"] == windows, f"world {world}: {r['test_samples']} windows"
            assert r["test_loss"] == pytest.approx(reference["test_loss"], rel=1e-9), f"world {world}"
            assert r["test_ppl"] == pytest.approx(reference["test_ppl"], rel=1e-9)


def test_two_ranks_train_like_one_process(tmp_path: Path) -> None:
    common = [*SMALL, "train.max_steps=5", "checkpoint.every_epochs=0", "sample.tokens=0"]
    one = run_ranks(train_trace, 1, "lm", common, str(tmp_path / "one"))[0]
    two = run_ranks(train_trace, 2, "lm", common, str(tmp_path / "two"))
    assert all(torch.equal(a, b) for a, b in zip(two[0], two[1])), "the ranks hold different weights"
    # Adam divides by the gradient's running size, so a weight whose gradient is ~0 can move by up to ~lr on
    # reduction-order noise alone: atol sits well below one step's update (lr 3e-3) and far above that noise.
    for step, (a, b) in enumerate(zip(two[0], one), start=1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=lambda m: f"after step {step}: {m}")
    assert not torch.equal(one[0], one[-1])


def test_sigterm_mid_epoch_then_resume_is_bit_identical(tmp_path: Path) -> None:
    args = ["trainers.lm", "--config", str(REPO / "configs" / "lm_debug.yaml"), *SMALL, "train.epochs=2",
            "run.log_every=1", "run.deterministic=true", "run.progress=lines", "sample.tokens=0"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert wait_all(fork_ranks([*args, f"run.dir={straight}"], 2, tmp_path), 300, tmp_path) == [0, 0]
    procs = fork_ranks([*args, f"run.dir={broken}"], 2, tmp_path)
    metrics = broken / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count('"train"') >= 8 or procs[0].poll() is not None,
             240, "step 8")
    procs[0].send_signal(signal.SIGTERM)
    assert wait_all(procs, 120, tmp_path) == [PREEMPTED_EXIT_CODE] * 2
    assert wait_all(fork_ranks([*args, f"run.dir={broken}"], 2, tmp_path), 300, tmp_path) == [0, 0]
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (straight, broken))
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run's"
    losses = [[(r["step"], r["loss"]) for r in _records(d, "train")] for d in (straight, broken)]
    assert losses[0] == losses[1], "the same losses, each step logged once"


def test_sampling_is_deterministic_for_a_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    assert run_cli([*LM, *SMALL, "train.max_steps=3", f"run.dir={run_dir}", "sample.tokens=0"],
                   timeout=300).returncode == 0
    first = run_cli(["trainers.lm", "sample", str(run_dir), "--tokens", "40", "--prompt", "the ", "--seed", "1"],
                    timeout=120)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("the ") and len(first.stdout.encode()) >= 40
    outputs = []  # the same command in this process: the same text for the same seed, another for another
    for seed in ("1", "2"):
        assert sample_command([str(run_dir), "--tokens", "40", "--prompt", "the ", "--seed", seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == first.stdout and outputs[1] != first.stdout
    assert sample_command([str(tmp_path / "nope")]) == 2
    assert "config.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("content, problem", [(None, "does not exist"), (b"", "is empty"),
                                              (b"\xff\xfe\x00bad", "is not UTF-8 text")],
                         ids=["missing", "empty", "not-utf8"])
def test_a_corpus_that_cannot_be_used_is_named_with_its_problem(tmp_path: Path, content: bytes | None,
                                                                problem: str) -> None:
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DatasetUnavailable, match=rf"{path}.*{problem}"):
        read_corpus(path)


def test_a_corpus_shorter_than_a_window_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "short.txt"
    path.write_text("to be or not to be")
    with pytest.raises(DatasetUnavailable, match=r"short\.txt has 18 tokens, too few .*data\.seq_len=32"):
        read_corpus(path).split(0.1, 32)
    result = run_cli([*LM, f"data.path={path}", "data.synthetic=false", "data.download=false", "data.seq_len=32",
                      f"run.dir={tmp_path / 'run'}"], timeout=120)
    assert result.returncode == 2 and "short.txt has 18 tokens" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_under_torchrun(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_command([str(Path(PYTHON).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                          "-m", "trainers.lm", "--config", str(REPO / "configs" / "lm_debug.yaml"), *SMALL,
                          "train.max_steps=6", f"run.dir={run_dir}", "run.progress=lines"], timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "torchrun" in result.stdout and "2 rank(s)" in result.stdout and result.stdout.count("sample at step") == 1
    assert (run_dir / "model.pt").is_file() and _records(run_dir, "end")[-1]["step"] == 6

"""What a user sees: errors they can act on, re-running a command, Ctrl-C, help, debug mode,
TensorBoard and the report. Real processes, CPU."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.signals import PREEMPTED_EXIT_CODE, StopFlag
from tests.dist_utils import PYTHON, REPO, fork_ranks, run_cli, run_command, start_ranks, wait_all, wait_for
from tests.tasks import DEBUG_CONFIG

BIN = Path(PYTHON).parent
CIFAR = [PYTHON, "-m", "trainers.cifar"]  # a fresh interpreter: for what happens as a process starts
QUICK = ["--config", str(DEBUG_CONFIG), "train.epochs=1", "run.progress=lines"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished QUICK run (16 steps, a train record every 2), trained once for the tests that start from a
    finished run; each takes its own copy (``_copy_of``)."""
    run_dir = tmp_path_factory.mktemp("shared") / "run"
    result = run_cli(["trainers.cifar", *QUICK, f"run.dir={run_dir}", "run.log_every=2"], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def _copy_of(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    return to


def _fails_cleanly(result, *phrases: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr[-3000:]


# --------------------------------------------------------------------------- errors a user can act on


@pytest.mark.parametrize("overrides, phrases", [
    (["train.batchsize=64"], ["'train.batchsize'", "did you mean 'train.batch_size'"]),
    (["train.epochs=many"], ["'train.epochs'"]),
    (["train.batch_size=0"], ["'train.batch_size' must be greater than 0"]),
    (["train.epochs=-1"], ["'train.epochs'"]),
    (["optim.lr=-0.1"], ["'optim.lr' must not be below 0"]),
    (["train.lr=0.1"], ["renamed to 'optim.lr'"]),
    (["model.name=tiny", "model.width=0"], ["'model.width'"]),
    (["model.name=resnet18", "model.width=32"], ["model.width=32 applies to model.name=tiny only"]),
    (["dist.backend=nccl"], ["nccl needs CUDA"]),
    (["train.label_smoothing=1.5"], ["'train.label_smoothing' must not be above 1"]),
    (["optim.betas=[0.9,1.0]"], ["'optim.betas'", "[0, 1)"]),
    (["dist.timeout_s=0"], ["'dist.timeout_s' must be greater than 0"]),
], ids=["unknown-key", "wrong-type", "zero-batch", "negative-epochs", "negative-lr", "renamed", "zero-width",
        "width-combination", "nccl-on-cpu", "label-smoothing-above-1", "beta-of-1", "zero-timeout"])
def test_bad_settings_end_in_one_message_and_exit_2(tmp_path: Path, overrides: list[str], phrases: list[str]) -> None:
    result = run_command([*CIFAR, *QUICK, f"run.dir={tmp_path / 'run'}", *overrides], timeout=120)
    _fails_cleanly(result, *phrases)
    assert not (tmp_path / "run").exists(), "a refused run leaves no run directory behind"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_requested_without_a_gpu(tmp_path: Path) -> None:
    _fails_cleanly(run_command([*CIFAR, *QUICK, "dist.device=cuda"], timeout=120), "CUDA is not available")


@pytest.mark.parametrize("text, phrase", [(None, "does not exist"), ("", "is empty"), ("# nothing\n", "is empty"),
                                          ("train: [1,\n", "not valid YAML")], ids=["missing", "empty", "comments",
                                                                                   "invalid"])
def test_bad_config_files(tmp_path: Path, text: str | None, phrase: str) -> None:
    path = tmp_path / "cfg.yaml"
    if text is not None:
        path.write_text(text)
    _fails_cleanly(run_command([*CIFAR, "--config", str(path)], timeout=120), str(path), phrase)


def test_run_directory_that_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_cli(["trainers.cifar", *QUICK, f"run.dir={blocker / 'run'}"], timeout=120)
    _fails_cleanly(result, "cannot be written", "run.dir")


def test_checkpoint_of_another_model_is_refused_and_nothing_is_lost(tmp_path: Path, finished_run: Path) -> None:
    run_dir = _copy_of(finished_run, tmp_path / "run")
    saved_config = (run_dir / "config.yaml").read_text()
    checkpoints = sorted((run_dir / "checkpoints").iterdir())
    result = run_cli(["trainers.cifar", *QUICK, f"run.dir={run_dir}", "model.width=8"], timeout=300)
    _fails_cleanly(result, "do not fit this model")
    assert (run_dir / "config.yaml").read_text() == saved_config, "a refused run never rewrites config.yaml"
    assert sorted((run_dir / "checkpoints").iterdir()) == checkpoints


def test_busy_port_and_missing_rank_end_every_rank_in_bounded_time(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        procs = fork_ranks(["trainers.cifar", *QUICK, f"run.dir={tmp_path / 'run'}", "dist.timeout_s=5"], 2,
                           tmp_path, env={"MASTER_PORT": str(port)})
        codes = wait_all(procs, 90, tmp_path)
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [2, 2], logs
    assert f"127.0.0.1:{port} is already in use" in logs[0] and "MASTER_PORT" in logs[0]
    assert "rank 1: error: Rank 1 of 2 could not meet the other ranks" in logs[1]
    assert all("Traceback" not in log for log in logs)


def test_user_error_under_torchrun_is_one_message_naming_the_cause(tmp_path: Path) -> None:
    result = run_command([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "trainers.cifar",
                          *QUICK, "train.batch_size=129", f"run.dir={tmp_path / 'run'}"], timeout=180)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith(("error:", "rank 1: error:"))]
    assert len(ours) == 1 and "train.batch_size=129" in ours[0], result.stderr[-3000:]
    assert "ConfigError: train.batch_size=129" in result.stderr, "torchrun's summary names the root cause"
    # (torchrun's agent adds its own ChildFailedError traceback around that summary; no worker prints one)
    assert result.stderr.count("Traceback") <= 1


@pytest.mark.parametrize("rank, phase", [(1, "data"), (0, "model")])
def test_a_user_error_on_one_rank_ends_every_rank_at_once(tmp_path: Path, rank: int, phase: str) -> None:
    """Rank 1's data folder missing (or a problem rank 0 alone meets): the ranks agree that set-up failed, so
    every rank ends within seconds with exit 2 and the message appears once, from rank 0, naming the rank."""
    args = ["tests.failing_task", *QUICK, f"run.dir={tmp_path / 'run'}", "dist.timeout_s=300"]
    # 60 s, far below dist.timeout_s: a rank left waiting for the failed one would fail the test here
    codes = wait_all(fork_ranks(args, 2, tmp_path, env={"FAIL_RANK": str(rank), "FAIL_AT": phase}), 60, tmp_path)
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    assert codes == [2, 2], logs
    expected = f"{'rank 1: ' if rank else ''}error: /data/rank{rank} does not exist"
    assert sum(line.startswith(expected) for log in logs for line in log.splitlines()) == 1, logs
    assert logs[1].strip() == "" or "error" not in logs[1], "rank 1 says nothing more"
    assert all("Traceback" not in log for log in logs)
    assert not (tmp_path / "run").exists(), "a refused run leaves no run directory behind"


def test_tracebacks_on_request(tmp_path: Path) -> None:
    result = run_command([*CIFAR, *QUICK, "optim.lr=-1"], timeout=120, env={"DISTLAUNCH_TRACEBACK": "1"})
    assert result.returncode == 2 and "Traceback" in result.stderr and "'optim.lr'" in result.stderr


# --------------------------------------------------------------------------- re-running, stopping


def test_same_command_resumes_and_a_changed_value_starts_a_new_run(tmp_path: Path) -> None:
    def train(*extra: str):  # the default run directory, relative to the working directory
        result = run_cli(["trainers.cifar", *QUICK, *extra], timeout=300, cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    first = train()
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("cifar-debug-") and "new run" in first
    again = train("data.num_workers=1")  # loading workers do not change what is trained: same run, finished
    assert list((tmp_path / "runs").iterdir()) == runs
    assert "This run has already finished: step 16" in again and f"({Path('runs') / runs[0].name})" in again
    other = train("optim.lr=0.1")
    assert len(list((tmp_path / "runs").iterdir())) == 2 and "new run" in other


def test_running_a_finished_run_again_says_so_and_rewrites_nothing(tmp_path: Path) -> None:
    """The same command after the run finished (also under torchrun instead of plain python): where the run is,
    how to train a new one; its checkpoints and model.pt untouched, no data loaded (no offline warning again)."""
    run_dir = tmp_path / "run"
    offline = ["data.synthetic=false", "data.download=false", "data.synthetic_fallback=true",
               f"data.root={tmp_path / 'nowhere'}", f"run.dir={run_dir}"]
    first = run_cli(["trainers.cifar", *QUICK, *offline], timeout=300)
    assert first.returncode == 0 and "Using synthetic CIFAR-shaped data instead" in first.stderr, first.stderr[-2000:]
    outputs = sorted(p for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock")
    stamps = {p: p.stat().st_mtime_ns for p in outputs}
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "trainers.cifar", *QUICK, *offline]
    for under_torchrun in (False, True):
        again = (run_command(torchrun, timeout=300) if under_torchrun
                 else run_cli(["trainers.cifar", *QUICK, *offline], timeout=300))
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        assert again.stdout.count("This run has already finished: step 16") == 1, again.stdout
        assert "run.name=NAME" in again.stdout and str(run_dir / "model.pt") in again.stdout
        assert "steps trained" not in again.stdout and "synthetic" not in again.stderr, again.stderr
        assert {p: p.stat().st_mtime_ns for p in outputs} == stamps, "nothing rewritten"


def test_ctrl_c_checkpoints_and_a_second_one_interrupts_at_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    procs = start_ranks(["trainers.cifar", *QUICK, "run.log_every=1", "train.epochs=3", f"run.dir={run_dir}"], 1,
                        log_dir=tmp_path)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count('"train"') >= 3 or procs[0].poll() is not None,
             120, "step 3")
    procs[0].send_signal(signal.SIGINT)
    assert wait_all(procs, 60, tmp_path) == [PREEMPTED_EXIT_CODE], (tmp_path / "rank0.log").read_text()[-2000:]
    assert list((run_dir / "checkpoints").glob("step-*.pt")), "the first Ctrl-C writes a checkpoint"

    flag = StopFlag()
    flag._handle(signal.SIGINT, None)
    flag._handle(signal.SIGINT, None)  # the same Ctrl-C, forwarded again by torchrun's agent at once
    flag._at -= 5  # the user presses Ctrl-C again, seconds later
    with pytest.raises(KeyboardInterrupt):
        flag._handle(signal.SIGINT, None)


# --------------------------------------------------------------------------- help, debug, TensorBoard, report


def test_help_lists_every_key_without_importing_torch() -> None:
    from launcher.config import schema_keys
    from trainers.cifar import CifarConfig

    probe = ("import runpy, sys; sys.argv = ['trainers.cifar', '--help']\n"
             "try:\n    runpy.run_module('trainers.cifar', run_name='__main__')\n"
             "except SystemExit:\n    pass\nprint('torch imported:', 'torch' in sys.modules)")
    result = run_command([PYTHON, "-c", probe], timeout=60)
    assert "torch imported: False" in result.stdout
    missing = [k for k in schema_keys(CifarConfig) if f"  {k} (" not in result.stdout]
    assert not missing


@pytest.mark.parametrize("override, phrase", [("train.batchsize=64", "did you mean 'train.batch_size'"),
                                              ("train.epochs=many", "'train.epochs'"),
                                              ("optim.lr=-1", "'optim.lr' must not be below 0")],
                         ids=["unknown-key", "wrong-type", "out-of-range"])
def test_a_settings_error_is_reported_before_torch_is_imported(override: str, phrase: str) -> None:
    probe = (f"import runpy, sys; sys.argv = ['trainers.cifar', '{override}']\n"
             "try:\n    runpy.run_module('trainers.cifar', run_name='__main__')\n"
             "except SystemExit as e:\n    print('exit', e.code)\nprint('torch imported:', 'torch' in sys.modules)")
    result = run_command([PYTHON, "-c", probe], timeout=60)
    assert "exit 2" in result.stdout and "torch imported: False" in result.stdout, result.stdout + result.stderr
    assert phrase in result.stderr and "Traceback" not in result.stderr


def test_print_config_and_help_read_plainly() -> None:
    shown = run_command([*CIFAR, "--config", str(DEBUG_CONFIG), "--print-config"], timeout=120)
    assert shown.returncode == 0 and "  dir: runs/cifar-debug-" in shown.stdout, "the run directory it will use"
    help_text = run_command([*CIFAR, "--help"], timeout=60).stdout
    assert "**" not in help_text and "`" not in help_text and "Precision" not in help_text, "no markup, no class names"
    assert "train.precision (str, default auto)" in help_text and "optim.betas (list," in help_text


def test_debug_mode_one_process_few_batches_and_a_model_summary(tmp_path: Path) -> None:
    result = run_cli(["trainers.cifar", *QUICK, "run.debug=true", f"run.dir={tmp_path / 'run'}", "run.log_every=1"],
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # The summary runs one training batch (train.batch_size=128), not an evaluation batch (256)
    assert "parameters" in result.stdout and "Conv2d" in result.stdout and "input 128x3x32x32" in result.stdout
    assert "128x10" in result.stdout and "256x10" not in result.stdout
    table = result.stdout.split("model: ")[0]
    assert "DEBUG MODE (run.debug=true)" in table, "the status row says so"
    assert "differ from the defaults of cifar" in table and "config.yaml" in table
    assert "run.debug" in table and "run.seed" not in table, "only the keys that differ from the task's defaults"
    assert not [line for line in result.stdout.splitlines() if line != line.rstrip()], "a log gets no padding"
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert steps == [1, 2, 3, 4], "a handful of batches per epoch"
    two = run_command([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "trainers.cifar", *QUICK,
                       "run.debug=true"], timeout=120)
    assert two.returncode != 0 and "run.debug=true runs one process" in two.stderr


def test_tensorboard_event_files_hold_metrics_and_the_config(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    result = run_cli(["trainers.cifar", *QUICK, "run.tensorboard=true", "run.log_every=4", f"run.dir={run_dir}"],
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(run_dir)).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/samples_per_s", "eval/test_acc", "eval/test_loss",
            "epoch/samples_per_s", "epoch/data_wait"} <= scalars
    assert len(events.Scalars("train/loss")) == 4
    assert events.PluginTagToContent("hparams"), "the resolved config is recorded as hyperparameters"


def test_report_plots_several_runs_including_a_running_and_a_resumed_one(tmp_path: Path, finished_run: Path) -> None:
    from launcher.report import load_run

    done, running = _copy_of(finished_run, tmp_path / "done"), tmp_path / "running"
    running.mkdir()
    lines = (done / "metrics.jsonl").read_text().splitlines()
    # A resumed run logged steps 2 and 4 twice; a running one is mid-way through writing a line.
    (running / "metrics.jsonl").write_text("\n".join(lines[:3] + lines[1:5]) + '\n{"kind": "train", "st')
    run = load_run(running)
    assert [r["step"] for r in run.train] == sorted({r["step"] for r in run.train})
    out = tmp_path / "report.png"
    result = run_command([PYTHON, "-m", "launcher", "report", str(done), str(running), "--out", str(out)],
                         timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert "test_acc" in result.stdout and "done" in result.stdout and "running" in result.stdout
    missing = run_command([PYTHON, "-m", "launcher", "report", str(tmp_path / "nope")], timeout=60)
    assert missing.returncode == 2 and "metrics.jsonl" in missing.stderr


def test_report_reads_the_runs_own_end_and_marks_its_resumes(tmp_path: Path, finished_run: Path) -> None:
    """The table's final step, wall time and throughput are the run's own (its end record and summary), not the
    last logged step; a resume is one restart and a dotted line at its step in every panel, a re-run of the
    finished run none; each run keeps one colour in every panel, and each axis holds one metric."""
    import io

    from rich.console import Console

    from launcher.report import load_run, plot, summary

    run_dir = tmp_path / "run"
    base = ["trainers.cifar", *QUICK, f"run.dir={run_dir}", "run.log_every=5"]  # the last line logs step 15 of 16
    first = run_cli(base, timeout=300)
    assert first.returncode == 0
    longer = run_cli([*base, "train.epochs=2"], timeout=300)  # the same run, continued to 32 steps
    assert longer.returncode == 0 and "resumed at step 16" in longer.stdout
    assert "already finished" in run_cli([*base, "train.epochs=2"], timeout=300).stdout  # not a restart
    other = _copy_of(finished_run, tmp_path / "other")

    runs = [load_run(run_dir), load_run(other)]
    out = io.StringIO()
    Console(file=out, width=200).print(summary(runs))
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:4]]
            for line in out.getvalue().splitlines() if line.startswith("│")}
    assert rows["steps"] == ["32", "16"] and rows["restarts"] == ["1", "0"] and rows["state"][0] == "finished"
    times = [next(line for line in r.stdout.splitlines() if line.startswith("time ")) for r in (first, longer)]
    wall = float(rows["wall time"][0].split()[0].replace(",", ""))
    assert abs(wall - sum(float(t.split()[1].replace(",", "")) for t in times)) < 0.15, (rows, times)
    assert rows["throughput"][0] == times[1].split("(")[1].split()[0] + " samples/s", "the last attempt's own"

    fig = plot(runs, tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 20_000
    for ax in fig.axes:
        if not ax.get_ylabel():
            continue  # the epoch axes
        curves = [line for line in ax.lines if len(line.get_xdata()) > 2 or line.get_label() in ("run", "other")]
        assert [line.get_label() for line in curves] == ["run", "other"], "one metric per axis, each run once"
        assert [line.get_color() for line in curves] == ["#1f77b4", "#ff7f0e"], "one colour per run, every panel"
        marks = [line for line in ax.lines if line.get_linestyle() == ":"]
        assert [list(m.get_xdata()) for m in marks] == [[16, 16]], "the resume at step 16"
    assert {ax.get_ylabel() for ax in fig.axes} >= {"training loss", "test_acc", "test_loss", "learning rate"}


def test_missing_tensorboard_is_a_clear_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from launcher.errors import UserError
    from trainers.core.sinks import make_sink

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    with pytest.raises(UserError, match=r"pip install -e '\.\[tensorboard\]'"):
        make_sink(True, tmp_path, "quiet", tensorboard=True)


def test_one_live_run_per_directory_and_a_dead_run_does_not_block(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["trainers.cifar", *QUICK, "train.epochs=50", "run.log_every=1", f"run.dir={run_dir}"]
    first = fork_ranks(args, 1, tmp_path)[0]
    metrics = run_dir / "metrics.jsonl"
    try:
        wait_for(lambda: metrics.exists() and '"train"' in metrics.read_text() or first.poll() is not None, 120,
                 "the first run to train")
        second = run_cli(["trainers.cifar", *QUICK, f"run.dir={run_dir}"], timeout=120)
        _fails_cleanly(second, "is in use by a live run", f"pid {first.pid}")
    finally:
        first.kill()  # kill -9: its lock goes with it
        first.wait(timeout=30)
    third = run_cli(["trainers.cifar", *QUICK, "train.epochs=50", "train.max_steps=2", f"run.dir={run_dir}"],
                    timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` has a handler installed for ``sig`` (SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (sig - 1) & 1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_during_start_up_asks_for_a_requeue(tmp_path: Path, sig: signal.Signals) -> None:
    run_dir = tmp_path / "run"
    proc = start_ranks(["trainers.cifar", *QUICK, f"run.dir={run_dir}"], 1, log_dir=tmp_path)[0]
    # The handler goes in before torch is imported: the signal lands during imports or set-up.
    wait_for(lambda: _catches(proc.pid, sig) or proc.poll() is not None, 60, "the start-up handler")
    proc.send_signal(sig)
    assert wait_all([proc], 60, tmp_path) == [PREEMPTED_EXIT_CODE]
    log = (tmp_path / "rank0.log").read_text()
    assert f"stopped by {sig.name} during start-up" in log and "Traceback" not in log
    assert not (run_dir / "checkpoints").exists(), "nothing new to save"


def test_a_start_up_stop_swallowed_by_the_code_it_interrupted_still_ends_the_process(
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """The start-up handler raises SystemExit wherever the signal lands; a bare `except:` there (found inside an
    import, under load: the run then trained to the end and exited 0) swallows it. The stop flag, where the loop
    takes over, ends the process instead, before any step or checkpoint."""
    import os

    from launcher import signals

    monkeypatch.setattr(signals, "_stopped_during_startup", False)
    previous = {sig: signal.getsignal(sig) for sig in signals.STOP_SIGNALS}
    signals.stop_during_startup()
    try:
        try:
            os.kill(os.getpid(), signal.SIGUSR1)  # its handler runs before the next line: inside this block
        except:  # noqa: E722 - the kind of handler that swallowed it
            pass
        with pytest.raises(SystemExit) as stopped:
            StopFlag().install()
        assert stopped.value.code == PREEMPTED_EXIT_CODE
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert capfd.readouterr().err.count("stopped by SIGUSR1 during start-up") == 1


def test_workers_do_not_outlive_a_killed_torchrun(tmp_path: Path) -> None:
    import os
    import subprocess

    run_dir = tmp_path / "run"
    log = (tmp_path / "torchrun.log").open("w")
    agent = subprocess.Popen([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "trainers.cifar",
                              *QUICK, "train.epochs=50", "run.log_every=1", f"run.dir={run_dir}"], cwd=REPO,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT)
    metrics = run_dir / "metrics.jsonl"
    try:
        wait_for(lambda: metrics.exists() and '"train"' in metrics.read_text() or agent.poll() is not None, 120,
                 "training to start")
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True,
                                                    text=True).stdout.split()]
        assert len(workers) == 2, workers
        agent.kill()  # SIGKILL: the agent cannot pass anything on to its workers
        agent.wait(timeout=30)
        wait_for(lambda: not any(Path(f"/proc/{w}").exists() and "zombie" not in _state(w) for w in workers), 60,
                 "the orphaned workers to exit")
    finally:
        if agent.poll() is None:
            agent.kill()
    steps = metrics.read_text().count('"train"')
    assert steps < 50 * 16, "the workers stopped instead of training on"


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) for a PID namespace")
def test_torchrun_as_pid_1_of_a_container_trains(tmp_path: Path) -> None:
    """As in a container without an init process (`ENTRYPOINT ["torchrun", ...]`): torchrun is PID 1 of its PID
    namespace, so its workers' parent is PID 1, which must not read as "the agent is gone"."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"PID namespaces unavailable here: {probe.stderr.strip()}")
    run_dir = tmp_path / "run"
    result = run_command(["unshare", "--pid", "--fork", "--mount-proc", str(BIN / "torchrun"), "--standalone",
                          "--nproc_per_node=2", "-m", "trainers.cifar", *QUICK, f"run.dir={run_dir}"], timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (run_dir / "model.pt").exists()


@pytest.mark.parametrize("parent_changed", [False, True])
def test_a_worker_follows_only_the_agent_that_started_it(parent_changed: bool) -> None:
    """stop_with_parent stops the process at once when its parent is no longer the agent it started under (the
    agent died before the request), and otherwise lets it run; no PID is special."""
    code = ("import os, sys; from launcher.runtime import stop_with_parent; "
            f"stop_with_parent(os.getppid() {'+ 1' if parent_changed else ''}); print('still running')")
    result = run_command([PYTHON, "-c", code], timeout=60)
    if parent_changed:
        assert result.returncode == -signal.SIGTERM and "still running" not in result.stdout
    else:
        assert result.returncode == 0 and "still running" in result.stdout


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0]
    except (FileNotFoundError, IndexError):
        return "zombie"


def test_warnings_of_other_ranks_name_their_rank() -> None:
    probe = ("import warnings\nfrom trainers.core.entry import prefix_warnings\n"
             "prefix_warnings(1)\nwarnings.warn('disk almost full')")
    result = run_command([PYTHON, "-c", probe], timeout=60)
    assert "rank 1: " in result.stderr and "disk almost full" in result.stderr

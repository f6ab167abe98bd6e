"""Helpers for real multi-process (gloo, CPU) tests, each bounded in time.

``run_command`` runs a command in a fresh process; ``run_cli``, ``fork_ranks`` and ``run_ranks`` fork theirs from a
server instead (below), for the tests whose subject is what a run does rather than how an interpreter starts.

``run_ranks(fn, world_size)`` starts ``world_size`` fresh processes with the torchrun variables set,
calls ``fn(*args)`` in each and returns the results in rank order. They are forked from a server that imported
torch and the trainers once per test session (a rank then starts in milliseconds instead of the ~3 s of importing
torch), and none of them has run a torch operation or joined a process group before. Each rank gets the test's
environment as it is when run_ranks is called (not the server's, which is older), but variables that torch reads only
at import take the server's values. A rank that raises fails the test with its traceback; ranks still running at the
deadline are killed and the test fails saying so.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environ(rank: int, world_size: int, port: int) -> dict[str, str]:
    """torchrun's variables for one rank of a single-node job."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


# What the fork server imports once: everything a rank function needs that costs start-up time. torch's optimizers
# import torch._dynamo when the first one is built (about 2 s of CPU here), so every rank that trains would.
PRELOAD = ["torch", "torch._dynamo", "tests.tasks", "trainers.lm", "torch.distributed.checkpoint"]


def _worker(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, out: Any,
            environ: dict[str, str]) -> None:
    # The platform's default start method again, as in a fresh process: a child of the fork server inherits
    # "forkserver", so each DataLoader worker pool would start a fork server of its own (an interpreter and imports).
    mp.set_start_method(None, force=True)
    os.environ.clear()  # the test's environment now, not the fork server's from when it started
    os.environ.update({**environ, **rank_environ(rank, world_size, port)})
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 cores: do not oversubscribe
    import torch  # already imported by the fork server: its thread count must follow this rank's environment

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        # Plain pickle bytes: torch's queue pickler would share tensors through file descriptors
        # that vanish when this process exits.
        out.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        out.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180) -> list[Any]:
    """Results of ``fn(*args)`` on ``world_size`` gloo-ready ranks, in rank order."""
    ctx = _server()
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, out, dict(os.environ)), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            try:
                rank, ok, value = out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                missing = sorted(set(range(world_size)) - set(results))
                pytest.fail(f"ranks {missing} of {world_size} did not finish within {timeout}s (hang?)")
            if not ok:
                pytest.fail(f"rank {rank} failed:\n{value}{_the_others(out, procs, rank)}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]


def _the_others(out: Any, procs: list[Any], failed: int, grace: float = 10) -> str:
    """What the other ranks did when one failed: a peer's error often comes from the rank that really failed
    (a gloo "connection reset" means the other side died), so wait briefly for their reports and exit codes."""
    deadline = time.monotonic() + grace
    lines: list[str] = []
    reported = {failed}
    while len(reported) < len(procs) and time.monotonic() < deadline:
        try:
            rank, ok, value = out.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        reported.add(rank)
        lines.append(f"rank {rank} {'finished' if ok else 'failed:' + chr(10) + value}")
    for rank, p in enumerate(procs):
        if rank not in reported:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            state = "still running" if p.is_alive() else f"exited with code {p.exitcode} without reporting"
            lines.append(f"rank {rank} {state}")
    return "".join(f"\n--- {line}" for line in lines)


def run_command(cmd: Sequence[str], timeout: float = 300, env: dict[str, str] | None = None,
                cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run a CLI in a subprocess, bounded in time; the test fails with its output on a hang."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    try:
        return subprocess.run(list(cmd), cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout}s; output so far:\n{e.stdout}\n{e.stderr}")


PYTHON = sys.executable


def start_ranks(args: Sequence[str], world_size: int, env: dict[str, str] | None = None,
                log_dir: Path | None = None, wrap: dict[int, list[str]] | None = None) -> list[subprocess.Popen]:
    """Start ``python -m <args>`` as ``world_size`` ranks with torchrun's variables, as torchrun would,
    but as direct children so that a test can signal one rank. Output goes to log_dir/rank{r}.log;
    ``wrap[r]`` is a command prefix for rank r (e.g. a namespace wrapper)."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **rank_environ(rank, world_size, port), **(env or {})}
        out = open(log_dir / f"rank{rank}.log", "w") if log_dir else subprocess.DEVNULL
        cmd = [*(wrap or {}).get(rank, []), PYTHON, "-m", *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out,
                                      stderr=subprocess.STDOUT))
    return procs


class ForkedRank:
    """A rank of ``fork_ranks``, with the methods of ``subprocess.Popen`` that the tests use."""

    def __init__(self, process: Any) -> None:
        self.process = process
        self.pid: int = process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(f"rank {self.pid}", timeout or 0)
        return int(self.process.exitcode)

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.process.kill()


def _server() -> Any:
    """The fork server of this test process (started on first use; see run_ranks)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _cli_process(args: list[str], environ: dict[str, str], stdout: str, stderr: str, cwd: str) -> None:
    """``python -m <args>`` in a process forked from the server: the module runs as ``__main__`` from its source with
    the given environment and working directory, output to the files ``stdout`` and ``stderr`` (may be the same);
    exits with the module's exit status after the atexit handlers, as python does."""
    import atexit
    import runpy

    mp.set_start_method(None, force=True)  # the platform's default again (see _worker)
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    out = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(out if stderr == stdout else os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    import torch  # already imported by the server: its thread count must follow this process's environment

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sys.argv = list(args)
    # The server may have imported the module (a dependency of what it preloads): `python -m` runs it afresh as
    # __main__, and so does this (runpy would warn that it found it in sys.modules).
    sys.modules.pop(args[0], None)
    code = 0
    try:
        runpy.run_module(args[0], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def fork_ranks(args: Sequence[str], world_size: int, log_dir: Path, env: dict[str, str] | None = None) -> list[ForkedRank]:
    """``start_ranks`` without the interpreter start-up: each rank is forked from the server that imported torch and
    the trainers once (see run_ranks) and runs ``python -m <args>`` there, as its own process (signals, exit status,
    DataLoader workers and files as a fresh one). For the tests whose subject is a run, not how a process starts."""
    ctx = _server()
    port = free_port()
    ranks = []
    for rank in range(world_size):
        environ = {**os.environ, "OMP_NUM_THREADS": "1", **rank_environ(rank, world_size, port), **(env or {})}
        log = str(log_dir / f"rank{rank}.log")
        process = ctx.Process(target=_cli_process, args=(list(args), environ, log, log, str(REPO)))
        process.start()
        ranks.append(ForkedRank(process))
    return ranks


def run_cli(args: Sequence[str], timeout: float = 300, env: dict[str, str] | None = None,
            cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """``run_command([PYTHON, "-m", *args])`` without the interpreter start-up (about 3.5 s of CPU, most of such a
    run): the module runs in one process forked from the server (see fork_ranks), with the test's environment, ``cwd``,
    its own stdout and stderr, and its exit status (-N if a signal ended it). For the tests whose subject is what a
    run does; the tests of how a fresh process starts (imports, the launch modes, signals) keep run_command."""
    with tempfile.TemporaryDirectory(prefix="run_cli-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        process = _server().Process(target=_cli_process, args=(list(args), environ, str(out), str(err), str(cwd)))
        process.start()
        process.join(timeout)
        hung = process.exitcode is None
        if hung:
            process.kill()
            process.join(10)
        stdout, stderr = (f.read_text(errors="replace") if f.exists() else "" for f in (out, err))
        if hung:
            pytest.fail(f"python -m {' '.join(args)} did not exit within {timeout}s; output so far:\n{stdout}\n{stderr}")
        return subprocess.CompletedProcess([PYTHON, "-m", *args], process.exitcode, stdout, stderr)


def wait_all(procs: Sequence[subprocess.Popen | ForkedRank], timeout: float, logs: Path | None = None,
             log_file: Path | None = None) -> list[int]:
    """Exit codes of all processes; kills them all and fails the test, showing their logs (rank logs
    under ``logs``, or one ``log_file``), if the deadline passes."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        files = [logs / f"rank{r}.log" for r in range(len(procs))] if logs else [log_file] if log_file else []
        tail = "".join(f.read_text()[-2000:] for f in files if f and f.exists())
        pytest.fail(f"processes did not exit within {timeout}s (hang?)\n{tail}")


def wait_for(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.01) -> None:
    """Poll ``condition`` until true; fail the test naming ``what`` at the deadline (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)

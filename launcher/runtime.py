"""The process's distributed runtime: device, process group, named collectives, guaranteed teardown.

    with distributed(cfg.dist) as rt:
        ...  # rt.rank, rt.device, rt.is_main, rt.barrier("checkpoint")

Single-process runs are the world-size-1 case of the same code: every collective is a no-op there.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import socket
import sys
import threading
import traceback
from contextlib import AbstractContextManager as ContextManager, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from launcher import PARENT_AT_START
from launcher.config import DistConfig
from launcher.env import DistEnv, LaunchError, check_devices, resolve_env
from launcher.errors import UserError

T = TypeVar("T")


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names the phase and the likely cause."""


class SetupFailed(Exception):
    """A set-up step failed on some rank; raised on every rank at once (``Runtime.agreed``), carrying the first
    failure: its rank, and its message (a user error) or its traceback (a bug)."""

    raised_by_every_rank = True

    def __init__(self, rank: int, phase: str, kind: str, message: str, traceback_text: str, user_error: bool) -> None:
        super().__init__(message)
        self.rank, self.phase, self.kind, self.message = rank, phase, kind, message
        self.traceback_text, self.user_error = traceback_text, user_error

    @property
    def exit_code(self) -> int:
        """2 for a user error (the message says what to change), 1 for a bug (the traceback says where)."""
        return 2 if self.user_error else 1

    def report(self) -> str:
        """What rank 0 prints, once for the whole job: ``rank 1: error: ...``, or the failing rank's traceback."""
        prefix = f"rank {self.rank}: " if self.rank else ""
        if self.user_error:
            return f"{prefix}error: {self.message}"
        return f"{prefix}failed during set-up ({self.phase}):\n{self.traceback_text.rstrip()}"


def _failure(error: BaseException | None) -> dict[str, Any] | None:
    """A picklable account of a set-up failure (or None), for the agreement."""
    if error is None:
        return None
    user = isinstance(error, UserError)
    return {"kind": type(error).__name__, "message": str(error) if user else f"{type(error).__name__}: {error}",
            "user_error": user,
            "traceback_text": "" if user else "".join(traceback.format_exception(error))}


# gloo raises plain RuntimeErrors for timeouts and lost peers; nccl and the store raise DistErrors.
_COLLECTIVE_MARKERS = ("gloo", "nccl", "timed out", "connection closed", "connection reset", "broken pipe")


def _is_collective_failure(e: RuntimeError) -> bool:
    return isinstance(e, dist.DistError) or any(m in str(e).lower() for m in _COLLECTIVE_MARKERS)


@contextmanager
def phase(name: str, rank: int, timeout_s: float) -> Iterator[None]:
    """Re-raise a failed collective with the phase it belonged to, so a hang reads as a diagnosis."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, CollectiveError) or not _is_collective_failure(e):
            raise  # a bug in the step itself keeps its own traceback
        raise CollectiveError(
            f"Rank {rank}: a collective in phase '{name}' failed: {str(e).splitlines()[0] if str(e) else e!r}. "
            f"Another rank most likely died or stopped answering (its own log says why); ranks give up after "
            f"dist.timeout_s={timeout_s:g} seconds.") from e


@dataclass
class Runtime:
    """Who this process is and how it talks to the others."""

    env: DistEnv
    device: torch.device
    backend: str | None  # None for a single process (no process group)
    timeout_s: float
    # A gloo group on the CPU for small agreements (stop flags, object gathers): it never waits on the
    # GPU stream and works whatever the main backend is.
    control: Any = None

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        """The one process that logs and writes files (global rank 0)."""
        return self.env.is_main

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def phase(self, name: str) -> ContextManager[None]:
        return phase(name, self.rank, self.timeout_s)

    def barrier(self, name: str) -> None:
        """All ranks reach this point; the error names ``name`` if one does not."""
        if self.distributed:
            with self.phase(name):
                dist.barrier(group=self.control)

    def all_reduce(self, tensor: torch.Tensor, name: str, op: Any = None) -> torch.Tensor:
        """In-place sum (or ``op``) over ranks on the main backend; returns ``tensor``."""
        if self.distributed:
            with self.phase(name):
                dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor

    @contextmanager
    def agreed(self, phase: str) -> Iterator[None]:
        """Run a set-up step, then agree with every rank that it succeeded (one gather on the control group).

        When it failed on some rank, every rank raises ``SetupFailed`` with the first failure at once, so that
        no rank goes on into a collective (DDP's parameter broadcast, ...) that a failed rank will never reach.
        A single process re-raises its own error unchanged."""
        failure: BaseException | None = None
        try:
            yield
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, whatever it is
            if not self.distributed:
                raise
            failure = e
        reports = self.gather_objects(_failure(failure), f"set-up ({phase})")
        failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
        if failed:
            rank, report = failed[0]
            raise SetupFailed(rank, phase, **report) from failure

    def max_all(self, values: list[float], name: str) -> list[float]:
        """The element-wise maximum of ``values`` over all ranks, on every rank (one small all-reduce on the
        control group)."""
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        with self.phase(name):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return t.tolist()

    def gather_objects(self, obj: T, name: str) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank (small picklable objects only)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self.phase(name):
            dist.all_gather_object(out, obj, group=self.control)
        return out

    def describe_devices(self) -> str:
        """Every rank's device in one line, e.g. 'cuda NVIDIA H100 @ node1 (ranks 0-7); ...' (a collective)."""
        if self.device.type == "cuda":  # without the GPU index, so that the ranks of a node compact into one
            mine = f"cuda {torch.cuda.get_device_name(self.device)} @ {socket.gethostname()}"
        else:
            mine = f"cpu @ {socket.gethostname()}"
        seen: dict[str, list[int]] = {}
        for rank, dev in enumerate(self.gather_objects(mine, "start-up")):
            seen.setdefault(dev, []).append(rank)
        return "; ".join(f"{dev} (rank {r[0]})" if len(r) == 1 else f"{dev} (ranks {r[0]}-{r[-1]})"
                         for dev, r in seen.items())

    def broadcast_object(self, obj: T, name: str) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        with self.phase(name):
            dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]


def choose_device(env: DistEnv, cfg: DistConfig) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is wanted and present, else the CPU; checks GPUs against local ranks."""
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if not want_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LaunchError("dist.device=cuda but CUDA is not available on this machine; "
                          "set dist.device=cpu (or auto) or run on a GPU node.")
    visible = torch.cuda.device_count()
    if visible == 1 and env.gpus_per_task:
        # srun --gpus-per-task=1 gives each task its own single visible GPU.
        return torch.device("cuda", 0)
    check_devices(env, visible)
    return torch.device("cuda", env.local_rank)


def choose_backend(device: torch.device, cfg: DistConfig) -> str:
    """nccl for CUDA devices, gloo otherwise, unless the config names one."""
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise LaunchError("dist.backend=nccl needs CUDA devices but this process runs on the CPU; "
                          "set dist.backend=gloo (or auto).")
    return backend


def configure_determinism(deterministic: bool) -> None:
    """Deterministic kernels when asked (exact reproducibility), fastest kernels otherwise."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic or torch.are_deterministic_algorithms_enabled():
        # torch's setter imports the whole of inductor and dynamo (about 1.5 s of start-up on a CPU) to set its flag
        # there too; off, the default of both, needs no call.
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _rendezvous_store(env: DistEnv, timeout: timedelta) -> dist.Store:
    """The key-value store the ranks meet in, with one namespace per torchrun restart attempt.

    torchrun's agent hosts one store for the whole job and keeps it across worker restarts, and
    torch's env:// rendezvous adds no per-attempt prefix: a restarted rank can then read the previous
    attempt's keys (gloo peer addresses of dead processes) and fail to connect. Prefixing the keys
    with TORCHELASTIC_RESTART_COUNT keeps the attempts apart.
    """
    store = _with_deadline(lambda: dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                                                 is_master=env.rank == 0 and not env.agent_store, timeout=timeout,
                                                 multi_tenant=True), timeout.total_seconds() + STORE_GRACE_S)
    return dist.PrefixStore(f"attempt-{env.restart_count}", store)


#: Extra seconds a store connection gets beyond dist.timeout_s before the rank gives up on it.
STORE_GRACE_S = 5.0


def _with_deadline(make: Callable[[], T], seconds: float) -> T:
    """``make()``, or TimeoutError after ``seconds``.

    A TCPStore client that reaches a port where something else listens (a busy port, a stale
    process) connects and then waits for a handshake reply forever, whatever its timeout; so the
    connection is made in a daemon thread (torch releases the GIL there) that is abandoned if it
    does not answer, and the process can exit with a clear error.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = make()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = e

    worker = threading.Thread(target=target, name="rendezvous", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"no answer from the rendezvous store within {seconds:g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _rendezvous_problem(env: DistEnv, error: Exception, timeout: timedelta) -> LaunchError:
    """Why the ranks could not meet, and what to change; reported by each rank (the causes differ)."""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    where = f"{env.master_addr}:{env.master_port}"
    if "EADDRINUSE" in str(error) or "address already in use" in str(error).lower():
        problem = LaunchError(
            f"The rendezvous port {where} is already in use (another job, or a leftover process of an earlier run). "
            "Pick a free port: export MASTER_PORT=<port> (srun, sbatch), or torchrun --master_port / --rdzv-endpoint.")
    else:
        problem = LaunchError(
            f"Rank {env.rank} of {env.world_size} could not meet the other ranks at {where} within dist.timeout_s="
            f"{timeout.total_seconds():g}s ({detail}). A rank that failed to start (its own log says why), a "
            "rank that was never launched, or a MASTER_ADDR/MASTER_PORT that points elsewhere keeps the others "
            "waiting; fix that and re-run.")
    problem.same_on_every_rank = False
    return problem


def _init_process_group(env: DistEnv, device: torch.device, backend: str, timeout: timedelta) -> Any:
    # Every launcher ends in the same torchrun-style variables, so any library that reads
    # RANK/WORLD_SIZE works the same after SLURM or submitit.
    os.environ.update(env.contract())
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    try:
        dist.init_process_group(backend=backend, store=_rendezvous_store(env, timeout), rank=env.rank,
                                world_size=env.world_size, timeout=timeout, **kwargs)
        return dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    except (dist.DistError, RuntimeError, TimeoutError) as e:  # a busy port, a peer that never arrives
        raise _rendezvous_problem(env, e, timeout) from e


def stop_with_parent(agent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the launching agent ``agent_pid`` (our parent) dies, even by SIGKILL.

    Without it, workers of a killed agent train on into the run directory. SIGTERM is the ordinary
    stop signal: before training the process ends at once, in the loop at the next step (with a
    checkpoint). If the parent already changed, the agent died before the request: nobody would signal
    us, so we stop ourselves. Linux only (prctl); elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != agent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _leave_together(rt: Runtime) -> None:
    """Every rank reaches the end before any tears its process group down. A rank whose peer still has a message
    in flight (gloo's all_gather can return before its own send is done) while it destroys the group and exits
    can abort in gloo's teardown ("terminate called without an active exception")."""
    rt.barrier("shutdown")


@contextmanager
def distributed(cfg: DistConfig, env: DistEnv | None = None, device: torch.device | None = None) -> Iterator[Runtime]:
    """Bind the device, start the process group; always tear it down.

    ``env`` and ``device`` are resolved here unless the caller (the entry point) already resolved them."""
    env = env or resolve_env()
    if env.agent_is_parent:  # torchrun's worker: follow the agent that started us
        stop_with_parent(PARENT_AT_START)
    device = device or choose_device(env, cfg)
    backend = choose_backend(device, cfg)  # a backend that cannot work here fails before any rendezvous
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group, so NCCL never touches GPU 0 by mistake
    rt = Runtime(env=env, device=device, backend=None, timeout_s=cfg.timeout_s)
    try:
        if env.is_distributed:
            rt.backend = backend
            rt.control = _init_process_group(env, device, backend, timedelta(seconds=cfg.timeout_s))
        yield rt
        _leave_together(rt)
    except BaseException as e:
        if getattr(e, "raised_by_every_rank", False):  # agreed: every rank stops at this same point
            try:
                _leave_together(rt)
            except CollectiveError:
                pass  # the error that ends the run matters more
        # The traceback's frames hold the trainer (its DDP or FSDP model holds the process group): free their
        # locals, so that everything tied to the group goes below, while the group is alive.
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        if dist.is_initialized():
            # Objects tied to the process group (DDP's reducer, FSDP's device mesh) sit in reference cycles; freed
            # only at interpreter exit, after the group, they can abort the process ("terminate called without an
            # active exception"). Collect them now, while the group is alive, then tear it down.
            gc.collect()
            dist.destroy_process_group()
            rt.control = None

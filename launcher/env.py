"""Resolve this process's distributed identity from its environment.

This module is a pure function of an environment mapping: it imports no torch and touches no
global state, so it can be unit-tested with plain dicts and called before any heavy import.
Every launcher we support (torchrun, ``accelerate launch``, ``srun``, submitit, plain
``python``) is reduced to one :class:`DistEnv`, and :meth:`DistEnv.contract` turns that back
into torchrun-style variables so ``init_process_group(init_method="env://")`` works for all.

Precedence, first match wins:

1. torchrun / ``accelerate launch``: ``RANK`` and ``WORLD_SIZE`` are set.  They win over SLURM
   variables because ``srun torchrun ...`` is a common pattern in which SLURM describes one
   task per node while torchrun describes the real worker processes.
2. SLURM / submitit: ``SLURM_PROCID`` and a task count are set.
3. submitit's local executor (``python -m launcher submit --local``): ``SUBMITIT_LOCAL_GLOBALID``.
4. Otherwise a single process.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import hostlist

from launcher.errors import UserError

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500

# Ports derived from a SLURM job id land in [PORT_BASE, PORT_BASE + PORT_SPAN).  The range is
# unprivileged (> 1024) and ends below 32768, where Linux's default ephemeral range starts, so
# the kernel does not hand the port to some unrelated outgoing connection first.
PORT_BASE = 15000
PORT_SPAN = 17000

# `accelerate launch` exports these for its children in every launch mode (simple, multi-GPU,
# DeepSpeed, FSDP; see accelerate/utils/launch.py), while the Accelerator object never writes
# them itself.  ACCELERATE_USE_FSDP / _USE_DEEPSPEED are deliberately not used: Accelerator sets
# those in-process, so they would mislabel a plain torchrun job that uses accelerate as a library.
ACCELERATE_MARKERS = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND")

# submitit's generated sbatch script exports SUBMITIT_EXECUTOR=slurm before its srun line, and
# its job runner sets SUBMITIT_FOLDER in-process before calling the submitted function.
SUBMITIT_MARKERS = ("SUBMITIT_EXECUTOR", "SUBMITIT_FOLDER")

LAUNCHERS = ("torchrun", "accelerate", "slurm", "submitit", "single")

_TORCHRUN_HINT = (
    "check the torchrun/accelerate options (--nnodes, --nproc_per_node, --node_rank) and make "
    "sure no stale RANK/WORLD_SIZE/LOCAL_RANK variables are exported in your shell"
)
_SLURM_HINT = (
    "check the #SBATCH/srun options (--nodes, --ntasks, --ntasks-per-node) and do not set "
    "SLURM_* variables by hand"
)


class LaunchError(UserError, ValueError):
    """Inconsistent or unusable launch environment; the message says what to change."""

    same_on_every_rank = True


@dataclass(frozen=True)
class _Source:
    """Names of the variables each field came from, so error messages can point at them."""

    rank: str
    local_rank: str
    world_size: str
    local_world_size: str
    node_rank: str
    num_nodes: str
    hint: str


@dataclass(frozen=True)
class DistEnv:
    """Identity of this process within a (possibly single-process) distributed job."""

    launcher: str
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    job_id: str | None = None
    # Facts about the launching agent that the runtime needs (read here: the only module that reads
    # the environment).
    restart_count: int = 0  # TORCHELASTIC_RESTART_COUNT: which torchrun restart attempt this is
    agent_store: bool = False  # TORCHELASTIC_USE_AGENT_STORE: torchrun's agent hosts the rendezvous store
    gpus_per_task: bool = False  # SLURM_GPUS_PER_TASK: srun binds each task to its own GPU(s)
    requeue_count: int = 0  # SLURM_RESTART_COUNT: how often SLURM requeued this job

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part in the job."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the process that logs and writes checkpoints."""
        return self.rank == 0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        """Resolve the identity of this process from ``environ`` (default: this process's environment).

        Raises :class:`LaunchError` when the variables are malformed or contradict each other.
        """
        environ = os.environ if environ is None else environ
        if _has_torchrun(environ):
            env = _from_torchrun(environ)
        elif _has_slurm(environ):
            env = _from_slurm(environ)
        elif _get(environ, "SUBMITIT_LOCAL_GLOBALID") is not None:
            env = _from_submitit_local(environ)
        else:
            env = _single(environ)
        return replace(env, restart_count=_opt_int(environ, "TORCHELASTIC_RESTART_COUNT") or 0,
                       agent_store=_get(environ, "TORCHELASTIC_USE_AGENT_STORE") == "True",
                       gpus_per_task=_get(environ, "SLURM_GPUS_PER_TASK") is not None,
                       requeue_count=_opt_int(environ, "SLURM_RESTART_COUNT") or 0)

    def contract(self) -> dict[str, str]:
        """Torchrun-style variables describing this process, ready for ``os.environ.update``.

        GROUP_WORLD_SIZE is included as well (torchrun sets it too) so that resolving the
        contract again keeps the node count of uneven SLURM layouts such as ``2(x2),1``.
        """
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
            "GROUP_WORLD_SIZE": str(self.num_nodes),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


#: Set to 1 to see Python tracebacks for user errors too (they normally get a one-paragraph message).
TRACEBACK_VARIABLE = "DISTLAUNCH_TRACEBACK"


def tracebacks_requested(environ: Mapping[str, str] | None = None) -> bool:
    """True when the user asked for full tracebacks of user errors (``DISTLAUNCH_TRACEBACK=1``)."""
    return (_get(os.environ if environ is None else environ, TRACEBACK_VARIABLE) or "0") not in ("0", "false")


def elastic_error_file(environ: Mapping[str, str] | None = None) -> str | None:
    """Where torchrun wants a worker's error written (TORCHELASTIC_ERROR_FILE), so its summary names it."""
    return _get(os.environ if environ is None else environ, "TORCHELASTIC_ERROR_FILE")


def probable_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank as the launcher's variables say, without validating them (0 if unknown).

    For reporting an error before (or instead of) a full resolution: only rank 0 reports errors that
    every rank hits alike."""
    environ = os.environ if environ is None else environ
    for name in ("RANK", "SLURM_PROCID"):
        value = _get(environ, name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def check_devices(env: DistEnv, visible_gpus: int) -> None:
    """Raise :class:`LaunchError` if this node runs more local ranks than it has visible GPUs.

    Only call this when training on GPUs: ranks sharing a GPU make NCCL fail or hang.
    """
    if env.local_world_size <= visible_gpus:
        return
    if visible_gpus < 1:
        advice = (
            "request GPUs for the job (e.g. --gpus-per-node) and check CUDA_VISIBLE_DEVICES, "
            "or train on the CPU with dist.device=cpu"
        )
    else:
        advice = (
            f"start one rank per GPU (torchrun/accelerate: --nproc_per_node={visible_gpus}; "
            f"SLURM: --ntasks-per-node={visible_gpus}), check CUDA_VISIBLE_DEVICES, or train on "
            "the CPU with dist.device=cpu"
        )
    raise LaunchError(
        f"This node runs {env.local_world_size} local ranks (LOCAL_WORLD_SIZE="
        f"{env.local_world_size}, launcher {env.launcher}) but only {visible_gpus} GPU(s) are "
        f"visible, so local rank {visible_gpus} would have no GPU of its own; {advice}."
    )


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist such as ``gpu[01-03,07],cpu5`` into individual host names."""
    try:
        hosts = hostlist.expand_hostlist(nodelist.strip())
    except hostlist.BadHostlist as exc:
        raise LaunchError(
            f"Cannot parse the SLURM node list {nodelist!r} ({exc}); expected a hostlist such "
            "as 'node[01-04],gpu7'. Check SLURM_JOB_NODELIST/SLURM_STEP_NODELIST, or set "
            "MASTER_ADDR to the first node's address."
        ) from exc
    if not hosts or any(not host or host != host.strip() for host in hosts):
        raise LaunchError(
            f"The SLURM node list {nodelist!r} contains no usable host names; check "
            "SLURM_JOB_NODELIST/SLURM_STEP_NODELIST, or set MASTER_ADDR explicitly."
        )
    return hosts


def port_from_job_id(job_id: str, step_id: str | None = None) -> int:
    """Deterministic rendezvous port for a SLURM job, in ``[PORT_BASE, PORT_BASE + PORT_SPAN)``.

    Every task of a job computes the same port without talking to the others, and consecutive
    job ids get different ports so jobs sharing a node do not collide.  Array ids such as
    ``123_4`` (and heterogeneous ids such as ``123+1``) fold every number in, so two tasks of
    the same array running on one node get different ports.  A numeric ``step_id`` (srun's
    SLURM_STEP_ID) is folded in after a marker, so concurrent steps of one job differ too.
    """
    numbers = re.findall(r"\d+", job_id)
    if not numbers:
        raise LaunchError(
            f"SLURM_JOB_ID={job_id!r} contains no digits, so no port can be derived from it; "
            "set MASTER_PORT explicitly."
        )
    if step_id is not None:
        numbers += ["1", step_id]  # the marker keeps job 123 step 4 apart from array task 123_4
    value = 0
    for number in numbers:
        # 100003 is prime and larger than typical array indices: distinct ids stay distinct.
        value = value * 100003 + int(number)
    return PORT_BASE + value % PORT_SPAN


# --- reading variables -------------------------------------------------------------------


def _get(environ: Mapping[str, str], name: str) -> str | None:
    """Value of ``name``, with empty values treated as unset (``export X=$UNSET`` is common)."""
    value = environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _first(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    """The first of ``names`` that is set, as ``(name, value)``."""
    for name in names:
        value = _get(environ, name)
        if value is not None:
            return name, value
    return None


def _to_int(name: str, value: str) -> int:
    """Parse an integer variable, naming it in the error."""
    try:
        return int(value)
    except ValueError:
        raise LaunchError(
            f"{name}={value!r} is not an integer; fix or unset {name} (it is normally set by "
            "the launcher, so a hand-exported value is the usual culprit)."
        ) from None


def _opt_int(environ: Mapping[str, str], name: str) -> int | None:
    value = _get(environ, name)
    return None if value is None else _to_int(name, value)


def _req_int(environ: Mapping[str, str], name: str, why: str) -> int:
    value = _opt_int(environ, name)
    if value is None:
        raise LaunchError(f"{name} is not set although {why}; {_missing_advice(name)}.")
    return value


def _first_int(environ: Mapping[str, str], *names: str) -> tuple[str, int] | None:
    found = _first(environ, *names)
    return None if found is None else (found[0], _to_int(*found))


def _missing_advice(name: str) -> str:
    if name.startswith("SLURM_"):
        return "start the processes with srun so that SLURM sets all task variables"
    return "start the processes with torchrun or accelerate launch, which set all of them"


def _port(environ: Mapping[str, str]) -> int | None:
    """MASTER_PORT if set, validated to be a usable TCP port."""
    port = _opt_int(environ, "MASTER_PORT")
    if port is not None and not 1 <= port <= 65535:
        raise LaunchError(
            f"MASTER_PORT={port} is not a valid TCP port; set MASTER_PORT to a free port "
            "between 1024 and 65535."
        )
    return port


def _job_id(environ: Mapping[str, str]) -> str | None:
    """SLURM job id, else torchrun's rendezvous id (its default value "none" means unset)."""
    slurm = _first(environ, "SLURM_JOB_ID", "SLURM_JOBID")
    if slurm is not None:
        return slurm[1]
    run_id = _get(environ, "TORCHELASTIC_RUN_ID")
    return None if run_id is None or run_id == "none" else run_id


# --- validation --------------------------------------------------------------------------


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise LaunchError(message)


def _validate(env: DistEnv, src: _Source) -> None:
    """Cross-field checks shared by every launcher; messages name the variables involved."""
    world = f"{src.world_size}={env.world_size}"
    lws = f"{src.local_world_size}={env.local_world_size}"
    _require(env.world_size >= 1, f"{world} must be at least 1; {src.hint}.")
    _require(env.local_world_size >= 1, f"{lws} must be at least 1; {src.hint}.")
    _require(
        0 <= env.rank < env.world_size,
        f"{src.rank}={env.rank} is outside [0, {world}); {src.hint}.",
    )
    _require(
        0 <= env.local_rank < env.local_world_size,
        f"{src.local_rank}={env.local_rank} is outside [0, {lws}); {src.hint}.",
    )
    _require(
        env.local_world_size <= env.world_size,
        f"{lws} is larger than {world}; {src.hint}.",
    )
    nodes = f"{src.num_nodes}={env.num_nodes}"
    _require(
        1 <= env.num_nodes <= env.world_size,
        f"{nodes} must be between 1 and {world} (every node runs at least one rank); "
        f"{src.hint}.",
    )
    _require(
        0 <= env.node_rank < env.num_nodes,
        f"{src.node_rank}={env.node_rank} is outside [0, {nodes}); {src.hint}.",
    )


# --- torchrun / accelerate ---------------------------------------------------------------


def _has_torchrun(environ: Mapping[str, str]) -> bool:
    rank, world = _get(environ, "RANK"), _get(environ, "WORLD_SIZE")
    if (rank is None) != (world is None):
        present, absent = ("RANK", "WORLD_SIZE") if world is None else ("WORLD_SIZE", "RANK")
        raise LaunchError(
            f"{present} is set but {absent} is not, so this is neither a complete torchrun "
            f"environment nor a plain one; unset {present} if it is left over in your shell, "
            "or launch with torchrun/accelerate launch."
        )
    return rank is not None


def _from_torchrun(environ: Mapping[str, str]) -> DistEnv:
    rank = _to_int("RANK", environ["RANK"].strip())
    world = _to_int("WORLD_SIZE", environ["WORLD_SIZE"].strip())
    _require(world >= 1, f"WORLD_SIZE={world} must be at least 1; {_TORCHRUN_HINT}.")
    lws_name, lws = "LOCAL_WORLD_SIZE", _opt_int(environ, "LOCAL_WORLD_SIZE")
    if lws is None:
        # Older or hand-rolled launchers omit it; a single node is the only safe reading.
        lws_name, lws = "LOCAL_WORLD_SIZE (unset, assumed =WORLD_SIZE)", world
    _require(lws >= 1, f"{lws_name}={lws} must be at least 1; {_TORCHRUN_HINT}.")
    nodes_name, num_nodes = _torchrun_nodes(environ, world, lws)
    local_rank = _opt_int(environ, "LOCAL_RANK")
    node_rank = _opt_int(environ, "GROUP_RANK")
    env = DistEnv(
        launcher="accelerate" if _first(environ, *ACCELERATE_MARKERS) else "torchrun",
        rank=rank,
        local_rank=rank % lws if local_rank is None else local_rank,
        world_size=world,
        local_world_size=lws,
        node_rank=rank // lws if node_rank is None else node_rank,
        num_nodes=num_nodes,
        master_addr=_torchrun_master_addr(environ, world),
        master_port=_torchrun_master_port(environ, world),
        job_id=_job_id(environ),
    )
    src = _Source(
        "RANK", "LOCAL_RANK", "WORLD_SIZE", lws_name, "GROUP_RANK", nodes_name, _TORCHRUN_HINT
    )
    _validate(env, src)
    return env


def _torchrun_nodes(environ: Mapping[str, str], world: int, lws: int) -> tuple[str, int]:
    """Node count: GROUP_WORLD_SIZE when torchrun gives it, else derived assuming equal nodes."""
    group_world = _opt_int(environ, "GROUP_WORLD_SIZE")
    if group_world is not None:
        # Trusted as is: torchrun allows a different --nproc_per_node on each node, and the
        # contract of an uneven SLURM layout carries it, so world need not be nodes * lws.
        return "GROUP_WORLD_SIZE", group_world
    _require(
        world % lws == 0,
        f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={lws}, so the processes "
        f"cannot be spread evenly over nodes; {_TORCHRUN_HINT} (or set GROUP_WORLD_SIZE if "
        "nodes really run different numbers of processes).",
    )
    return "WORLD_SIZE/LOCAL_WORLD_SIZE", world // lws


def _torchrun_master_addr(environ: Mapping[str, str], world: int) -> str:
    addr = _get(environ, "MASTER_ADDR")
    if addr is not None:
        return addr
    _require(
        world == 1,
        f"WORLD_SIZE={world} but MASTER_ADDR is not set, so the ranks cannot find rank 0; set "
        "MASTER_ADDR (torchrun: --master_addr or --rdzv_endpoint; accelerate: "
        "--main_process_ip).",
    )
    return DEFAULT_MASTER_ADDR


def _torchrun_master_port(environ: Mapping[str, str], world: int) -> int:
    port = _port(environ)
    if port is not None:
        return port
    _require(
        world == 1,
        f"WORLD_SIZE={world} but MASTER_PORT is not set, so the ranks cannot find rank 0; set "
        "MASTER_PORT (torchrun: --master_port or --rdzv_endpoint; accelerate: "
        "--main_process_port).",
    )
    return DEFAULT_MASTER_PORT


# --- SLURM / submitit --------------------------------------------------------------------


def _has_slurm(environ: Mapping[str, str]) -> bool:
    return _get(environ, "SLURM_PROCID") is not None and (
        _first(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") is not None
    )


def _in_srun_step(environ: Mapping[str, str]) -> bool:
    """True inside a job step started by srun, where there is one process per SLURM task.

    slurmstepd exports SLURM_STEP_ID only for real (numbered) steps.  The batch script, the
    interactive step of salloc and the extern step use reserved ids that are not exported, so
    the variable is absent there even though SLURM_PROCID=0 and SLURM_NTASKS are.  A
    non-numeric value (some sites or wrappers write "batch") is treated the same way.
    """
    step = _first(environ, "SLURM_STEP_ID", "SLURM_STEPID")
    return step is not None and step[1].isdigit()


def _check_slurm_step(environ: Mapping[str, str], world_name: str, world: int) -> None:
    """Refuse a multi-task allocation that was entered without srun.

    A plain `python train.py` in an sbatch script is ONE process, yet it sees SLURM_PROCID=0
    and SLURM_NTASKS=N.  Trusting N would make rank 0 wait forever for N-1 ranks that were
    never started, so that case is an error; with a single task it is a valid single process.
    """
    if world <= 1 or _in_srun_step(environ):
        return
    raise LaunchError(
        f"{world_name}={world} but this process is not inside an srun job step (SLURM_STEP_ID "
        "is not set): a plain `python ...` line in an sbatch script starts only one process, "
        "so the other ranks would never arrive. Launch it with `srun python ...` (one process "
        "per task), use `srun torchrun ...`, or request --ntasks=1 for a single-process job."
    )


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    # The STEP_* variants describe the srun step this process belongs to; the plain ones
    # describe the allocation and can differ (srun -n/-N smaller than the job, srun -E).
    world_name, world = _slurm_world(environ)
    _check_slurm_step(environ, world_name, world)
    why = "SLURM_PROCID is"
    rank = _req_int(environ, "SLURM_PROCID", why)
    local_rank = _req_int(environ, "SLURM_LOCALID", why)
    node_rank = _req_int(environ, "SLURM_NODEID", why)
    nodes_name, num_nodes = _slurm_nodes(environ)
    _require(
        0 <= node_rank < num_nodes,
        f"SLURM_NODEID={node_rank} is outside [0, {nodes_name}={num_nodes}); {_SLURM_HINT}.",
    )
    lws_name, lws = _slurm_local_world(environ, world_name, world, nodes_name, num_nodes, node_rank)
    env = DistEnv(
        launcher="submitit" if _first(environ, *SUBMITIT_MARKERS) else "slurm",
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=lws,
        node_rank=node_rank,
        num_nodes=num_nodes,
        master_addr=_slurm_master_addr(environ, world),
        master_port=_slurm_master_port(environ),
        job_id=_job_id(environ),
    )
    src = _Source(
        "SLURM_PROCID", "SLURM_LOCALID", world_name, lws_name, "SLURM_NODEID", nodes_name,
        _SLURM_HINT,
    )
    _validate(env, src)
    return env


def _slurm_world(environ: Mapping[str, str]) -> tuple[str, int]:
    found = _first_int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    if found is None:  # unreachable after _has_slurm; kept so the type is honest
        raise LaunchError(f"SLURM_NTASKS is not set; {_SLURM_HINT}.")
    return found


def _slurm_nodes(environ: Mapping[str, str]) -> tuple[str, int]:
    found = _first_int(environ, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    # SLURM always sets one of these; without any, a single node is the only safe reading.
    return found if found is not None else ("SLURM_NNODES (unset, assumed 1)", 1)


def _parse_tasks_per_node(name: str, value: str) -> list[int]:
    """Expand a SLURM tasks-per-node string such as ``2(x2),1`` into ``[2, 2, 1]``."""
    try:
        return [int(count) for count in hostlist.parse_slurm_tasks_per_node(value)]
    except hostlist.BadHostlist as exc:
        raise LaunchError(
            f"{name}={value!r} is not a SLURM tasks-per-node list ({exc}); expected a form such "
            f"as '4', '2(x3)' or '2(x2),1'; {_SLURM_HINT}."
        ) from exc


def _slurm_local_world(
    environ: Mapping[str, str],
    world_name: str,
    world: int,
    nodes_name: str,
    num_nodes: int,
    node_rank: int,
) -> tuple[str, int]:
    """Number of tasks on this node, checked against the task and node counts."""
    found = _first(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if found is None:
        _require(
            world % num_nodes == 0,
            f"{world_name}={world} is not a multiple of {nodes_name}={num_nodes} and "
            "SLURM_TASKS_PER_NODE is not set, so the tasks on this node are unknown; "
            f"{_SLURM_HINT}.",
        )
        return f"{world_name}/{nodes_name}", world // num_nodes
    tpn_name, tpn_value = found
    per_node = _parse_tasks_per_node(tpn_name, tpn_value)
    _require(
        len(per_node) == num_nodes,
        f"{tpn_name}={tpn_value!r} lists {len(per_node)} node(s) but {nodes_name}={num_nodes}; "
        f"{_SLURM_HINT}.",
    )
    _require(
        sum(per_node) == world,
        f"{tpn_name}={tpn_value!r} adds up to {sum(per_node)} tasks but {world_name}={world}; "
        f"{_SLURM_HINT}.",
    )
    return f"{tpn_name}[{node_rank}]", per_node[node_rank]


def _slurm_master_addr(environ: Mapping[str, str], world: int) -> str:
    addr = _get(environ, "MASTER_ADDR")
    if addr is not None:
        return addr
    # Task 0 always runs on the first node of the step, so that host is rank 0's.
    found = _first(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if found is not None:
        return expand_nodelist(found[1])[0]
    _require(
        world == 1,
        f"SLURM runs {world} tasks but neither MASTER_ADDR nor SLURM_STEP_NODELIST/"
        "SLURM_JOB_NODELIST is set, so rank 0 cannot be located; set MASTER_ADDR to the first "
        "node's address.",
    )
    return DEFAULT_MASTER_ADDR


def _slurm_master_port(environ: Mapping[str, str]) -> int:
    port = _port(environ)
    if port is not None:
        return port
    job = _first(environ, "SLURM_JOB_ID", "SLURM_JOBID")
    # Without a job id every task still agrees on the fixed default.
    if job is None:
        return DEFAULT_MASTER_PORT
    # Each srun step gets its own port, so that two multi-rank steps running at once in one job (e.g.
    # `srun ... &` twice) do not both try to host their rendezvous on the same port.
    step = _first(environ, "SLURM_STEP_ID", "SLURM_STEPID")
    return port_from_job_id(job[1], step[1] if step is not None and step[1].isdigit() else None)


# --- submitit's local executor ------------------------------------------------------------


def _from_submitit_local(environ: Mapping[str, str]) -> DistEnv:
    """Tasks of ``submit --local``: submitit starts them on this machine and numbers them itself."""
    why = "SUBMITIT_LOCAL_GLOBALID is"
    world = _req_int(environ, "SUBMITIT_LOCAL_NTASKS", why)
    rank = _req_int(environ, "SUBMITIT_LOCAL_GLOBALID", why)
    job = _get(environ, "SUBMITIT_LOCAL_JOB_ID") or ""
    port = _port(environ)
    env = DistEnv(launcher="submitit", rank=rank, local_rank=_req_int(environ, "SUBMITIT_LOCAL_LOCALID", why),
                  world_size=world, local_world_size=world, node_rank=0, num_nodes=1,
                  master_addr=DEFAULT_MASTER_ADDR,
                  master_port=port if port is not None else (port_from_job_id(job) if job else DEFAULT_MASTER_PORT),
                  job_id=job or None)
    _validate(env, _Source("SUBMITIT_LOCAL_GLOBALID", "SUBMITIT_LOCAL_LOCALID", "SUBMITIT_LOCAL_NTASKS",
                           "SUBMITIT_LOCAL_NTASKS", "(one node)", "(one node)",
                           "start local jobs with `python -m launcher submit --local`"))
    return env


# --- single process ----------------------------------------------------------------------


def _single(environ: Mapping[str, str]) -> DistEnv:
    """A lone process: loopback rendezvous, MASTER_PORT honoured so parallel runs can coexist.

    MASTER_ADDR is ignored on purpose: a stale remote address left in the shell would only make
    a one-process job fail to reach its own store.
    """
    port = _port(environ)
    return DistEnv(
        launcher="single",
        rank=0,
        local_rank=0,
        world_size=1,
        local_world_size=1,
        node_rank=0,
        num_nodes=1,
        master_addr=DEFAULT_MASTER_ADDR,
        master_port=DEFAULT_MASTER_PORT if port is None else port,
        job_id=_job_id(environ),
    )

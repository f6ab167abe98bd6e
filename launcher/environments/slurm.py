"""SLURM tasks started by srun (``srun python -m ...``), including submitit's jobs on a cluster: one
process per task, identity from SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS and the node list."""

from __future__ import annotations

import re
from collections.abc import Mapping

import hostlist

from launcher.environments.base import (DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, DistEnv, Environment, LaunchError,
                                        Source, first, first_int, get, job_id, port, req_int, require, validate)

# submitit's generated sbatch script exports SUBMITIT_EXECUTOR=slurm before its srun line, and
# its job runner sets SUBMITIT_FOLDER in-process before calling the submitted function.
SUBMITIT_MARKERS = ("SUBMITIT_EXECUTOR", "SUBMITIT_FOLDER")

# Ports derived from a SLURM job id land in [PORT_BASE, PORT_BASE + PORT_SPAN).  The range is
# unprivileged (> 1024) and ends below 32768, where Linux's default ephemeral range starts, so
# the kernel does not hand the port to some unrelated outgoing connection first.
PORT_BASE = 15000
PORT_SPAN = 17000

HINT = (
    "check the #SBATCH/srun options (--nodes, --ntasks, --ntasks-per-node) and do not set "
    "SLURM_* variables by hand"
)


class Slurm(Environment):
    """A task of an srun step; ``submitit`` when submitit started the job."""

    name = "slurm"

    def detect(self, environ: Mapping[str, str]) -> bool:
        return get(environ, "SLURM_PROCID") is not None and (
            first(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") is not None)

    def gpus_per_task(self, environ: Mapping[str, str]) -> bool:
        return get(environ, "SLURM_GPUS_PER_TASK") is not None

    def resolve(self, environ: Mapping[str, str]) -> DistEnv:
        # The STEP_* variants describe the srun step this process belongs to; the plain ones
        # describe the allocation and can differ (srun -n/-N smaller than the job, srun -E).
        world_name, world = _world(environ)
        _check_step(environ, world_name, world)
        why = "SLURM_PROCID is"
        rank = req_int(environ, "SLURM_PROCID", why)
        local_rank = req_int(environ, "SLURM_LOCALID", why)
        node_rank = req_int(environ, "SLURM_NODEID", why)
        nodes_name, num_nodes = _nodes(environ)
        require(0 <= node_rank < num_nodes,
                f"SLURM_NODEID={node_rank} is outside [0, {nodes_name}={num_nodes}); {HINT}.")
        lws_name, lws = _local_world(environ, world_name, world, nodes_name, num_nodes, node_rank)
        env = DistEnv(
            launcher="submitit" if first(environ, *SUBMITIT_MARKERS) else "slurm",
            rank=rank,
            local_rank=local_rank,
            world_size=world,
            local_world_size=lws,
            node_rank=node_rank,
            num_nodes=num_nodes,
            master_addr=_master_addr(environ, world),
            master_port=_master_port(environ),
            job_id=job_id(environ),
        )
        validate(env, Source("SLURM_PROCID", "SLURM_LOCALID", world_name, lws_name, "SLURM_NODEID", nodes_name, HINT))
        return env


def in_srun_step(environ: Mapping[str, str]) -> bool:
    """True inside a job step started by srun, where there is one process per SLURM task.

    slurmstepd exports SLURM_STEP_ID only for real (numbered) steps.  The batch script, the
    interactive step of salloc and the extern step use reserved ids that are not exported, so
    the variable is absent there even though SLURM_PROCID=0 and SLURM_NTASKS are.  A
    non-numeric value (some sites or wrappers write "batch") is treated the same way.
    """
    step = first(environ, "SLURM_STEP_ID", "SLURM_STEPID")
    return step is not None and step[1].isdigit()


def _check_step(environ: Mapping[str, str], world_name: str, world: int) -> None:
    """Refuse a multi-task allocation that was entered without srun.

    A plain `python train.py` in an sbatch script is ONE process, yet it sees SLURM_PROCID=0
    and SLURM_NTASKS=N.  Trusting N would make rank 0 wait forever for N-1 ranks that were
    never started, so that case is an error; with a single task it is a valid single process.
    """
    if world <= 1 or in_srun_step(environ):
        return
    raise LaunchError(
        f"{world_name}={world} but this process is not inside an srun job step (SLURM_STEP_ID "
        "is not set): a plain `python ...` line in an sbatch script starts only one process, "
        "so the other ranks would never arrive. Launch it with `srun python ...` (one process "
        "per task), use `srun torchrun ...`, or request --ntasks=1 for a single-process job."
    )


def _world(environ: Mapping[str, str]) -> tuple[str, int]:
    found = first_int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    if found is None:  # unreachable after detect(); kept so the type is honest
        raise LaunchError(f"SLURM_NTASKS is not set; {HINT}.")
    return found


def _nodes(environ: Mapping[str, str]) -> tuple[str, int]:
    found = first_int(environ, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    # SLURM always sets one of these; without any, a single node is the only safe reading.
    return found if found is not None else ("SLURM_NNODES (unset, assumed 1)", 1)


def _parse_tasks_per_node(name: str, value: str) -> list[int]:
    """Expand a SLURM tasks-per-node string such as ``2(x2),1`` into ``[2, 2, 1]``."""
    try:
        return [int(count) for count in hostlist.parse_slurm_tasks_per_node(value)]
    except hostlist.BadHostlist as exc:
        raise LaunchError(
            f"{name}={value!r} is not a SLURM tasks-per-node list ({exc}); expected a form such "
            f"as '4', '2(x3)' or '2(x2),1'; {HINT}."
        ) from exc


def _local_world(environ: Mapping[str, str], world_name: str, world: int, nodes_name: str, num_nodes: int,
                 node_rank: int) -> tuple[str, int]:
    """Number of tasks on this node, checked against the task and node counts."""
    found = first(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if found is None:
        require(
            world % num_nodes == 0,
            f"{world_name}={world} is not a multiple of {nodes_name}={num_nodes} and "
            f"SLURM_TASKS_PER_NODE is not set, so the tasks on this node are unknown; {HINT}.",
        )
        return f"{world_name}/{nodes_name}", world // num_nodes
    tpn_name, tpn_value = found
    per_node = _parse_tasks_per_node(tpn_name, tpn_value)
    require(len(per_node) == num_nodes,
            f"{tpn_name}={tpn_value!r} lists {len(per_node)} node(s) but {nodes_name}={num_nodes}; {HINT}.")
    require(sum(per_node) == world,
            f"{tpn_name}={tpn_value!r} adds up to {sum(per_node)} tasks but {world_name}={world}; {HINT}.")
    return f"{tpn_name}[{node_rank}]", per_node[node_rank]


def _master_addr(environ: Mapping[str, str], world: int) -> str:
    addr = get(environ, "MASTER_ADDR")
    if addr is not None:
        return addr
    # Task 0 always runs on the first node of the step, so that host is rank 0's.
    found = first(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if found is not None:
        return expand_nodelist(found[1])[0]
    require(
        world == 1,
        f"SLURM runs {world} tasks but neither MASTER_ADDR nor SLURM_STEP_NODELIST/"
        "SLURM_JOB_NODELIST is set, so rank 0 cannot be located; set MASTER_ADDR to the first "
        "node's address.",
    )
    return DEFAULT_MASTER_ADDR


def _master_port(environ: Mapping[str, str]) -> int:
    value = port(environ)
    if value is not None:
        return value
    job = first(environ, "SLURM_JOB_ID", "SLURM_JOBID")
    # Without a job id every task still agrees on the fixed default.
    if job is None:
        return DEFAULT_MASTER_PORT
    # Each srun step gets its own port, so that two multi-rank steps running at once in one job (e.g.
    # `srun ... &` twice) do not both try to host their rendezvous on the same port.
    step = first(environ, "SLURM_STEP_ID", "SLURM_STEPID")
    return port_from_job_id(job[1], step[1] if step is not None and step[1].isdigit() else None)


def _without_spaces(nodelist: str) -> str:
    """The hostlist with whitespace removed: between hosts it separates them like a comma (``a, b`` and
    ``a b``), inside brackets it is padding (``1.2.3.[089, 100-110]``)."""
    out, depth = [], 0
    for ch in nodelist.strip():
        depth += (ch == "[") - (ch == "]")
        if ch.isspace():
            if depth == 0:
                out.append(",")
            continue
        out.append(ch)
    return re.sub(",+", ",", "".join(out)).strip(",")


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist such as ``gpu[01-03,07],cpu5`` (spaces allowed) into individual host names."""
    try:
        hosts = hostlist.expand_hostlist(_without_spaces(nodelist))
    except hostlist.BadHostlist as exc:
        raise LaunchError(
            f"Cannot parse the SLURM node list {nodelist!r} ({exc}); expected a hostlist such "
            "as 'node[01-04],gpu7'. Check SLURM_JOB_NODELIST/SLURM_STEP_NODELIST, or set "
            "MASTER_ADDR to the first node's address."
        ) from exc
    if not hosts or any(not host or any(c.isspace() for c in host) for host in hosts):
        raise LaunchError(
            f"The SLURM node list {nodelist!r} contains no usable host names; check "
            "SLURM_JOB_NODELIST/SLURM_STEP_NODELIST, or set MASTER_ADDR explicitly."
        )
    return hosts


def port_from_job_id(job: str, step_id: str | None = None) -> int:
    """Deterministic rendezvous port for a SLURM job, in ``[PORT_BASE, PORT_BASE + PORT_SPAN)``.

    Every task of a job computes the same port without talking to the others, and consecutive
    job ids get different ports so jobs sharing a node do not collide.  Array ids such as
    ``123_4`` (and heterogeneous ids such as ``123+1``) fold every number in, so two tasks of
    the same array running on one node get different ports.  A numeric ``step_id`` (srun's
    SLURM_STEP_ID) is folded in after a marker, so concurrent steps of one job differ too.
    """
    numbers = re.findall(r"\d+", job)
    if not numbers:
        raise LaunchError(
            f"SLURM_JOB_ID={job!r} contains no digits, so no port can be derived from it; "
            "set MASTER_PORT explicitly."
        )
    if step_id is not None:
        numbers += ["1", step_id]  # the marker keeps job 123 step 4 apart from array task 123_4
    value = 0
    for number in numbers:
        # 100003 is prime and larger than typical array indices: distinct ids stay distinct.
        value = value * 100003 + int(number)
    return PORT_BASE + value % PORT_SPAN

"""torchrun and ``accelerate launch``: the elastic agent exports RANK, WORLD_SIZE and the rest for each
worker it starts. They win over SLURM's variables because ``srun torchrun ...`` is a common pattern in
which SLURM describes one task per node while torchrun describes the real worker processes."""

from __future__ import annotations

from collections.abc import Mapping

from launcher.environments.base import (DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, DistEnv, Environment, LaunchError,
                                        Source, first, get, job_id, opt_int, port, require, to_int, validate)

# `accelerate launch` exports these for its children in every launch mode (simple, multi-GPU,
# DeepSpeed, FSDP; see accelerate/utils/launch.py), while the Accelerator object never writes
# them itself.  ACCELERATE_USE_FSDP / _USE_DEEPSPEED are deliberately not used: Accelerator sets
# those in-process, so they would mislabel a plain torchrun job that uses accelerate as a library.
ACCELERATE_MARKERS = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND")

# torchrun's agent (also inside `accelerate launch`) exports these to every worker it starts, and nothing
# else does: a hand-rolled launcher that only sets RANK/WORLD_SIZE from a shell is not an agent to follow.
AGENT_MARKERS = ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_MAX_RESTARTS")

HINT = (
    "check the torchrun/accelerate options (--nnodes, --nproc_per_node, --node_rank) and make "
    "sure no stale RANK/WORLD_SIZE/LOCAL_RANK variables are exported in your shell"
)


class Torchrun(Environment):
    """Workers of torchrun's elastic agent (or of ``accelerate launch``, which runs the same agent)."""

    name = "torchrun"

    def detect(self, environ: Mapping[str, str]) -> bool:
        rank, world = get(environ, "RANK"), get(environ, "WORLD_SIZE")
        if (rank is None) != (world is None):
            present, absent = ("RANK", "WORLD_SIZE") if world is None else ("WORLD_SIZE", "RANK")
            raise LaunchError(
                f"{present} is set but {absent} is not, so this is neither a complete torchrun "
                f"environment nor a plain one; unset {present} if it is left over in your shell, "
                "or launch with torchrun/accelerate launch."
            )
        return rank is not None

    def agent_is_parent(self, environ: Mapping[str, str]) -> bool:
        return first(environ, *AGENT_MARKERS) is not None

    def resolve(self, environ: Mapping[str, str]) -> DistEnv:
        rank = to_int("RANK", environ["RANK"].strip())
        world = to_int("WORLD_SIZE", environ["WORLD_SIZE"].strip())
        require(world >= 1, f"WORLD_SIZE={world} must be at least 1; {HINT}.")
        lws_name, lws = "LOCAL_WORLD_SIZE", opt_int(environ, "LOCAL_WORLD_SIZE")
        if lws is None:
            # Older or hand-rolled launchers omit it; a single node is the only safe reading.
            lws_name, lws = "LOCAL_WORLD_SIZE (unset, assumed =WORLD_SIZE)", world
        require(lws >= 1, f"{lws_name}={lws} must be at least 1; {HINT}.")
        nodes_name, num_nodes = _nodes(environ, world, lws)
        local_rank = opt_int(environ, "LOCAL_RANK")
        node_rank = opt_int(environ, "GROUP_RANK")
        env = DistEnv(
            launcher="accelerate" if first(environ, *ACCELERATE_MARKERS) else "torchrun",
            rank=rank,
            local_rank=rank % lws if local_rank is None else local_rank,
            world_size=world,
            local_world_size=lws,
            node_rank=rank // lws if node_rank is None else node_rank,
            num_nodes=num_nodes,
            master_addr=_master_addr(environ, world),
            master_port=_master_port(environ, world),
            job_id=job_id(environ),
        )
        validate(env, Source("RANK", "LOCAL_RANK", "WORLD_SIZE", lws_name, "GROUP_RANK", nodes_name, HINT))
        return env


def _nodes(environ: Mapping[str, str], world: int, lws: int) -> tuple[str, int]:
    """Node count: GROUP_WORLD_SIZE when torchrun gives it, else derived assuming equal nodes."""
    group_world = opt_int(environ, "GROUP_WORLD_SIZE")
    if group_world is not None:
        # Trusted as is: torchrun allows a different --nproc_per_node on each node, and the
        # contract of an uneven SLURM layout carries it, so world need not be nodes * lws.
        return "GROUP_WORLD_SIZE", group_world
    require(
        world % lws == 0,
        f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={lws}, so the processes "
        f"cannot be spread evenly over nodes; {HINT} (or set GROUP_WORLD_SIZE if "
        "nodes really run different numbers of processes).",
    )
    return "WORLD_SIZE/LOCAL_WORLD_SIZE", world // lws


def _master_addr(environ: Mapping[str, str], world: int) -> str:
    addr = get(environ, "MASTER_ADDR")
    if addr is not None:
        return addr
    require(
        world == 1,
        f"WORLD_SIZE={world} but MASTER_ADDR is not set, so the ranks cannot find rank 0; set "
        "MASTER_ADDR (torchrun: --master_addr or --rdzv_endpoint; accelerate: "
        "--main_process_ip).",
    )
    return DEFAULT_MASTER_ADDR


def _master_port(environ: Mapping[str, str], world: int) -> int:
    value = port(environ)
    if value is not None:
        return value
    require(
        world == 1,
        f"WORLD_SIZE={world} but MASTER_PORT is not set, so the ranks cannot find rank 0; set "
        "MASTER_PORT (torchrun: --master_port or --rdzv_endpoint; accelerate: "
        "--main_process_port).",
    )
    return DEFAULT_MASTER_PORT

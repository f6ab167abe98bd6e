"""What every launch environment shares: the resolved identity (``DistEnv``), the plug-in interface
(``Environment``), and careful reading of environment variables (errors name the variable and the fix).

Pure functions of a mapping: no torch, no global state, so every environment is unit-tested with dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from launcher.errors import UserError

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500


class LaunchError(UserError, ValueError):
    """Inconsistent or unusable launch environment; the message says what to change."""

    same_on_every_rank = True


@dataclass(frozen=True)
class DistEnv:
    """Identity of this process within a (possibly single-process) distributed job, and the launch
    environment's traits that the runtime needs."""

    launcher: str  # the environment's name: torchrun, accelerate, slurm, submitit or single
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    job_id: str | None = None
    # Traits of the environment (resolved once, with the identity):
    agent_is_parent: bool = False  # the launching agent (torchrun) is this process's parent: its death stops us
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


class Environment:
    """One way of launching processes (a plug-in): how to recognise it, and who this process is under it.

    ``detect`` and ``resolve`` are pure functions of the environment mapping. The traits default to what
    most environments have; an environment overrides those that differ.
    """

    #: Short name shown as ``launch`` in the start-up table (``resolve`` may refine it, e.g. accelerate).
    name = ""

    def detect(self, environ: Mapping[str, str]) -> bool:
        """True when this process was started by this environment."""
        raise NotImplementedError

    def resolve(self, environ: Mapping[str, str]) -> DistEnv:
        """This process's identity; LaunchError naming the variables when they are malformed or contradict."""
        raise NotImplementedError

    def agent_is_parent(self, environ: Mapping[str, str]) -> bool:
        """True when the parent process is a launching agent whose death must stop this process."""
        return False

    def gpus_per_task(self, environ: Mapping[str, str]) -> bool:
        """True when the scheduler gives each task its own GPU(s), visible as device 0."""
        return False


@dataclass(frozen=True)
class Source:
    """Names of the variables each field came from, so error messages can point at them."""

    rank: str
    local_rank: str
    world_size: str
    local_world_size: str
    node_rank: str
    num_nodes: str
    hint: str


# --- reading variables -------------------------------------------------------------------


def get(environ: Mapping[str, str], name: str) -> str | None:
    """Value of ``name``, with empty values treated as unset (``export X=$UNSET`` is common)."""
    value = environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def first(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    """The first of ``names`` that is set, as ``(name, value)``."""
    for name in names:
        value = get(environ, name)
        if value is not None:
            return name, value
    return None


def to_int(name: str, value: str) -> int:
    """Parse an integer variable, naming it in the error."""
    try:
        return int(value)
    except ValueError:
        raise LaunchError(
            f"{name}={value!r} is not an integer; fix or unset {name} (it is normally set by "
            "the launcher, so a hand-exported value is the usual culprit)."
        ) from None


def opt_int(environ: Mapping[str, str], name: str) -> int | None:
    value = get(environ, name)
    return None if value is None else to_int(name, value)


def req_int(environ: Mapping[str, str], name: str, why: str) -> int:
    value = opt_int(environ, name)
    if value is None:
        raise LaunchError(f"{name} is not set although {why}; {_missing_advice(name)}.")
    return value


def first_int(environ: Mapping[str, str], *names: str) -> tuple[str, int] | None:
    found = first(environ, *names)
    return None if found is None else (found[0], to_int(*found))


def _missing_advice(name: str) -> str:
    if name.startswith("SLURM_"):
        return "start the processes with srun so that SLURM sets all task variables"
    return "start the processes with torchrun or accelerate launch, which set all of them"


def port(environ: Mapping[str, str]) -> int | None:
    """MASTER_PORT if set, validated to be a usable TCP port."""
    value = opt_int(environ, "MASTER_PORT")
    if value is not None and not 1 <= value <= 65535:
        raise LaunchError(
            f"MASTER_PORT={value} is not a valid TCP port; set MASTER_PORT to a free port "
            "between 1024 and 65535."
        )
    return value


def job_id(environ: Mapping[str, str]) -> str | None:
    """SLURM job id, else torchrun's rendezvous id (its default value "none" means unset)."""
    slurm = first(environ, "SLURM_JOB_ID", "SLURM_JOBID")
    if slurm is not None:
        return slurm[1]
    run_id = get(environ, "TORCHELASTIC_RUN_ID")
    return None if run_id is None or run_id == "none" else run_id


# --- validation --------------------------------------------------------------------------


def require(ok: bool, message: str) -> None:
    if not ok:
        raise LaunchError(message)


def validate(env: DistEnv, src: Source) -> None:
    """Cross-field checks shared by every launcher; messages name the variables involved."""
    world = f"{src.world_size}={env.world_size}"
    lws = f"{src.local_world_size}={env.local_world_size}"
    require(env.world_size >= 1, f"{world} must be at least 1; {src.hint}.")
    require(env.local_world_size >= 1, f"{lws} must be at least 1; {src.hint}.")
    require(0 <= env.rank < env.world_size, f"{src.rank}={env.rank} is outside [0, {world}); {src.hint}.")
    require(0 <= env.local_rank < env.local_world_size,
            f"{src.local_rank}={env.local_rank} is outside [0, {lws}); {src.hint}.")
    require(env.local_world_size <= env.world_size, f"{lws} is larger than {world}; {src.hint}.")
    nodes = f"{src.num_nodes}={env.num_nodes}"
    require(1 <= env.num_nodes <= env.world_size,
            f"{nodes} must be between 1 and {world} (every node runs at least one rank); {src.hint}.")
    require(0 <= env.node_rank < env.num_nodes, f"{src.node_rank}={env.node_rank} is outside [0, {nodes}); {src.hint}.")

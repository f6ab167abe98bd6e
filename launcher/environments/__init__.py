"""Launch environments as plug-ins, chosen from a priority list: the first whose ``detect`` is true resolves
this process's identity (``DistEnv``), with the environment's traits filled in.

Priority, first match wins:

1. torchrun / ``accelerate launch`` (RANK and WORLD_SIZE): they win over SLURM because ``srun torchrun``
   describes one SLURM task per node but one torchrun worker per rank.
2. SLURM / submitit on a cluster (SLURM_PROCID and a task count).
3. submitit's local executor (SUBMITIT_LOCAL_GLOBALID).
4. A single process.

Adding an environment (Kubernetes' PyTorchJob, an MPI launcher): write a module with an ``Environment``
subclass (``detect``, ``resolve``, and the traits that differ from the defaults) and put an instance in
``ENVIRONMENTS`` before the ones it must win over.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace

from launcher.environments.base import DistEnv, Environment, LaunchError, get, opt_int
from launcher.environments.single import Single
from launcher.environments.slurm import Slurm
from launcher.environments.submitit_local import SubmititLocal
from launcher.environments.torchrun import Torchrun

__all__ = ["ENVIRONMENTS", "DistEnv", "Environment", "LaunchError", "detect", "resolve"]

ENVIRONMENTS: tuple[Environment, ...] = (Torchrun(), Slurm(), SubmititLocal(), Single())


def detect(environ: Mapping[str, str]) -> Environment:
    """The first environment of the priority list that recognises ``environ`` (Single always does)."""
    return next(env for env in ENVIRONMENTS if env.detect(environ))


def resolve(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Who this process is (default: this process's environment), with its environment's traits.

    Raises :class:`LaunchError` when the variables are malformed or contradict each other.
    """
    environ = os.environ if environ is None else environ
    environment = detect(environ)
    env = environment.resolve(environ)
    # Restart and requeue counts belong to the agent and the scheduler, whichever started the process
    # (under `srun torchrun` the identity is torchrun's, the requeue count SLURM's).
    return replace(env, agent_is_parent=environment.agent_is_parent(environ),
                   restart_count=opt_int(environ, "TORCHELASTIC_RESTART_COUNT") or 0,
                   agent_store=get(environ, "TORCHELASTIC_USE_AGENT_STORE") == "True",
                   gpus_per_task=environment.gpus_per_task(environ),
                   requeue_count=opt_int(environ, "SLURM_RESTART_COUNT") or 0)

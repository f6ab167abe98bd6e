"""Who this process is: the launch environment resolved into one :class:`DistEnv`, and the few other
facts the entry points read from the environment.

    env = resolve_env()          # torchrun, accelerate, SLURM, submitit (cluster or local), or one process

Each launch environment is a plug-in in ``launcher/environments/`` (detection, resolution, traits),
chosen from a priority list; :meth:`DistEnv.contract` turns any of them back into torchrun-style
variables, so ``init_process_group(init_method="env://")`` works for all. This module imports no torch
and touches no global state: everything here is a function of an environment mapping.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from launcher.environments import ENVIRONMENTS, DistEnv, Environment, LaunchError
from launcher.environments import resolve as resolve_env
from launcher.environments.base import DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, get
from launcher.environments.slurm import PORT_BASE, PORT_SPAN, expand_nodelist, port_from_job_id

__all__ = ["DistEnv", "Environment", "ENVIRONMENTS", "LaunchError", "resolve_env", "check_devices", "expand_nodelist",
           "port_from_job_id", "probable_rank", "tracebacks_requested", "elastic_error_file", "DEFAULT_MASTER_ADDR",
           "DEFAULT_MASTER_PORT", "PORT_BASE", "PORT_SPAN", "TRACEBACK_VARIABLE"]

#: Set to 1 to see Python tracebacks for user errors too (they normally get a one-paragraph message).
TRACEBACK_VARIABLE = "DISTLAUNCH_TRACEBACK"


def tracebacks_requested(environ: Mapping[str, str] | None = None) -> bool:
    """True when the user asked for full tracebacks of user errors (``DISTLAUNCH_TRACEBACK=1``)."""
    return (get(os.environ if environ is None else environ, TRACEBACK_VARIABLE) or "0") not in ("0", "false")


def elastic_error_file(environ: Mapping[str, str] | None = None) -> str | None:
    """Where torchrun wants a worker's error written (TORCHELASTIC_ERROR_FILE), so its summary names it."""
    return get(os.environ if environ is None else environ, "TORCHELASTIC_ERROR_FILE")


def probable_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank as the launcher's variables say, without validating them (0 if unknown).

    For reporting an error before (or instead of) a full resolution: only rank 0 reports errors that
    every rank hits alike."""
    environ = os.environ if environ is None else environ
    for name in ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        value = get(environ, name)
        if value is not None and value.isdigit():
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

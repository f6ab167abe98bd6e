"""submitit's local executor (``python -m launcher submit --local``): submitit starts the tasks on this
machine and numbers them itself (SUBMITIT_LOCAL_*)."""

from __future__ import annotations

from collections.abc import Mapping

from launcher.environments.base import (DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, DistEnv, Environment, Source, get,
                                        port, req_int, validate)
from launcher.environments.slurm import port_from_job_id


class SubmititLocal(Environment):
    """Tasks of submitit's LocalExecutor: one node, gloo or one GPU each."""

    name = "submitit"

    def detect(self, environ: Mapping[str, str]) -> bool:
        return get(environ, "SUBMITIT_LOCAL_GLOBALID") is not None

    def resolve(self, environ: Mapping[str, str]) -> DistEnv:
        why = "SUBMITIT_LOCAL_GLOBALID is"
        world = req_int(environ, "SUBMITIT_LOCAL_NTASKS", why)
        job = get(environ, "SUBMITIT_LOCAL_JOB_ID") or ""
        given = port(environ)
        env = DistEnv(launcher=self.name, rank=req_int(environ, "SUBMITIT_LOCAL_GLOBALID", why),
                      local_rank=req_int(environ, "SUBMITIT_LOCAL_LOCALID", why), world_size=world,
                      local_world_size=world, node_rank=0, num_nodes=1, master_addr=DEFAULT_MASTER_ADDR,
                      master_port=given if given is not None else (port_from_job_id(job) if job else DEFAULT_MASTER_PORT),
                      job_id=job or None)
        validate(env, Source("SUBMITIT_LOCAL_GLOBALID", "SUBMITIT_LOCAL_LOCALID", "SUBMITIT_LOCAL_NTASKS",
                             "SUBMITIT_LOCAL_NTASKS", "(one node)", "(one node)",
                             "start local jobs with `python -m launcher submit --local`"))
        return env

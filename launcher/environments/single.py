"""A lone process (plain ``python -m ...``): the world-size-1 case of the same code."""

from __future__ import annotations

from collections.abc import Mapping

from launcher.environments.base import DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, DistEnv, Environment, job_id, port


class Single(Environment):
    """Always detected: the last entry of the priority list."""

    name = "single"

    def detect(self, environ: Mapping[str, str]) -> bool:
        return True

    def resolve(self, environ: Mapping[str, str]) -> DistEnv:
        """Loopback rendezvous, MASTER_PORT honoured so parallel runs can coexist.

        MASTER_ADDR is ignored on purpose: a stale remote address left in the shell would only make
        a one-process job fail to reach its own store.
        """
        given = port(environ)
        return DistEnv(launcher=self.name, rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
                       num_nodes=1, master_addr=DEFAULT_MASTER_ADDR,
                       master_port=DEFAULT_MASTER_PORT if given is None else given, job_id=job_id(environ))

"""Two hosts on one machine: a 2-node torchrun job (c10d rendezvous) across two network namespaces.

Each "node" runs in its own network namespace (its own interfaces, no shared loopback) and its own UTS
namespace (its own hostname), joined by a veth pair; ``ip netns exec`` gives each one an /etc/hosts
naming both. So the rendezvous endpoint, the master address and gloo's connections are resolved by
name and cross a real network interface, as between two machines. Needs root and iproute2; skipped
otherwise, saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.dist_utils import REPO, fork_ranks, wait_all
from tests.submit_utils import DEBUG_CONFIG, assert_same_weights, records


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    missing = [tool for tool in ("ip", "unshare") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (iproute2, util-linux)"
    probe = f"probe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if made.returncode == 0 else f"cannot create a network namespace: {made.stderr.strip()}"


_WHY = _unavailable()
pytestmark = [pytest.mark.skipif(_WHY is not None, reason=_WHY or ""), pytest.mark.timeout(300)]

NODES = {"node-a": "10.77.0.1", "node-b": "10.77.0.2"}


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_hosts() -> Iterator[dict[str, str]]:
    """Two namespaces joined by a veth pair; yields hostname -> namespace name."""
    tag = uuid.uuid4().hex[:6]
    spaces = {host: f"th-{host[-1]}-{tag}" for host in NODES}
    links = {host: f"v{host[-1]}{tag}" for host in NODES}
    hosts_file = "127.0.0.1 localhost\n" + "".join(f"{ip} {host}\n" for host, ip in NODES.items())
    try:
        for host, ns in spaces.items():
            _ip("netns", "add", ns)
            Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{ns}/hosts").write_text(hosts_file)  # ip netns exec mounts it on /etc/hosts
        _ip("link", "add", links["node-a"], "type", "veth", "peer", "name", links["node-b"])
        for host, ns in spaces.items():
            _ip("link", "set", links[host], "netns", ns)
            _ip("-n", ns, "addr", "add", f"{NODES[host]}/24", "dev", links[host])
            _ip("-n", ns, "link", "set", links[host], "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield spaces
    finally:
        for ns in spaces.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # removes the veth pair too
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def _bytes_received(ns: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/dev"], capture_output=True, text=True,
                         check=True).stdout
    return sum(int(line.split(":")[1].split()[0]) for line in out.splitlines()
               if ":" in line and not line.strip().startswith(("lo:", "Inter", "face")))


def test_torchrun_across_two_network_namespaces(two_hosts: dict[str, str], tmp_path: Path) -> None:
    run_dir = tmp_path / "two-hosts"
    train = ["-m", "trainers.cifar", "--config", str(DEBUG_CONFIG), f"run.dir={run_dir}", "run.progress=lines",
             "run.deterministic=true"]
    procs = []
    for host, ns in two_hosts.items():
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                    "--rdzv_backend=c10d", "--rdzv_endpoint=node-a:29611", f"--rdzv_id={run_dir.parent.name}", *train]
        inner = f"hostname {host} && exec {' '.join(torchrun)}"
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", inner], cwd=REPO,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=open(tmp_path / f"{host}.log", "w"),
                                      stderr=subprocess.STDOUT))
    codes = wait_all(procs, 150, log_file=tmp_path / "node-a.log")
    logs = {host: (tmp_path / f"{host}.log").read_text() for host in two_hosts}
    assert codes == [0, 0], f"exit codes {codes}\n" + "\n".join(f"--- {h}\n{t[-2500:]}" for h, t in logs.items())
    assert "cpu @ node-a (rank 0); cpu @ node-b (rank 1)" in logs["node-a"], logs["node-a"][-3000:]
    assert "2 rank(s) = 2 node(s) x 1" in logs["node-a"]
    start = records(run_dir, "start")
    assert len(start) == 1 and start[0]["world_size"] == 2
    assert all(_bytes_received(ns) > 100_000 for ns in two_hosts.values()), "the ranks did not talk over the veth pair"

    # Both nodes' ranks trained the same model: it is the one two ranks on one host train (forked, see fork_ranks).
    one_host, logs = tmp_path / "one-host", tmp_path / "one-host-logs"
    logs.mkdir()
    local = wait_all(fork_ranks([*train[1:-3], f"run.dir={one_host}", "run.progress=lines", "run.deterministic=true"],
                                2, logs), 240, logs)
    assert local == [0, 0], (logs / "rank0.log").read_text()[-3000:]
    assert_same_weights(run_dir, one_host)

"""Tests for launcher.env and launcher/environments/: pure environment-to-identity resolution, no torch,
no processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from launcher.env import (
    DEFAULT_MASTER_PORT,
    PORT_BASE,
    PORT_SPAN,
    DistEnv,
    LaunchError,
    check_devices,
    expand_nodelist,
    port_from_job_id,
    resolve_env,
)


def torchrun_env(
    rank: int, local_rank: int, world: int, lws: int, group_rank: int, **extra: str
) -> dict[str, str]:
    """The variables torchrun's elastic agent exports for one worker."""
    env = {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(lws),
        "GROUP_RANK": str(group_rank),
        "GROUP_WORLD_SIZE": str(world // lws),
        "ROLE_RANK": str(rank),
        "ROLE_WORLD_SIZE": str(world),
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29400",
        "TORCHELASTIC_RUN_ID": "none",
    }
    env.update(extra)
    return env


def slurm_env(
    procid: int,
    localid: int,
    nodeid: int,
    ntasks: int,
    nnodes: int,
    tasks_per_node: str,
    nodelist: str = "gpu[01-02]",
    step: bool = True,
    **extra: str,
) -> dict[str, str]:
    """The variables a task of `srun` (step=True) or an sbatch batch script (step=False) sees."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOBID": "4242",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": str(nodeid),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_NNODES": str(nnodes),
        "SLURM_JOB_NUM_NODES": str(nnodes),
        "SLURM_TASKS_PER_NODE": tasks_per_node,
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_NODELIST": nodelist,
    }
    if step:
        env.update(
            SLURM_STEP_ID="0",
            SLURM_STEPID="0",
            SLURM_STEP_NUM_TASKS=str(ntasks),
            SLURM_STEP_NUM_NODES=str(nnodes),
            SLURM_STEP_TASKS_PER_NODE=tasks_per_node,
            SLURM_STEP_NODELIST=nodelist,
        )
    env.update(extra)
    return env


def raises_naming(environ: dict[str, str], *names: str) -> str:
    """Resolve, expect a LaunchError, and check the message names every offending variable."""
    with pytest.raises(LaunchError) as info:
        resolve_env(environ)
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} missing from: {message}"
    assert "\n" not in message  # one paragraph
    return message


# --- nothing set -------------------------------------------------------------------------


def test_nothing_set_is_single_process() -> None:
    env = resolve_env({})
    assert env == DistEnv("single", 0, 0, 1, 1, 0, 1, "127.0.0.1", DEFAULT_MASTER_PORT, None)
    assert not env.is_distributed
    assert env.is_main


def test_single_honours_master_port_but_not_stale_master_addr() -> None:
    env = resolve_env({"MASTER_PORT": "31337", "MASTER_ADDR": "far.away"})
    assert (env.launcher, env.master_addr, env.master_port) == ("single", "127.0.0.1", 31337)


def test_empty_values_count_as_unset() -> None:
    env = resolve_env({"RANK": "", "WORLD_SIZE": " ", "MASTER_PORT": ""})
    assert env.launcher == "single"
    assert env.master_port == DEFAULT_MASTER_PORT


def test_single_keeps_slurm_job_id_of_batch_script_without_ntasks() -> None:
    # `python train.py` in an sbatch script without --ntasks: no task count, one process.
    env = resolve_env({"SLURM_JOB_ID": "77", "SLURM_PROCID": "0"})
    assert (env.launcher, env.world_size, env.job_id) == ("single", 1, "77")


# --- torchrun / accelerate ---------------------------------------------------------------


def test_torchrun_single_node() -> None:
    env = resolve_env(torchrun_env(rank=3, local_rank=3, world=4, lws=4, group_rank=0))
    assert env == DistEnv("torchrun", 3, 3, 4, 4, 0, 1, "10.0.0.1", 29400, None)
    assert env.is_distributed and not env.is_main


def test_torchrun_multi_node() -> None:
    env = resolve_env(torchrun_env(rank=13, local_rank=5, world=16, lws=8, group_rank=1))
    assert (env.rank, env.local_rank, env.node_rank, env.num_nodes) == (13, 5, 1, 2)
    assert env.local_world_size == 8


def test_torchrun_derives_missing_optional_fields() -> None:
    environ = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
               "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    env = resolve_env(environ)
    assert (env.local_rank, env.node_rank, env.num_nodes) == (1, 1, 2)


def test_torchrun_without_local_world_size_assumes_one_node() -> None:
    environ = {"RANK": "2", "WORLD_SIZE": "3", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    env = resolve_env(environ)
    assert (env.local_world_size, env.num_nodes, env.local_rank, env.node_rank) == (3, 1, 2, 0)


def test_torchrun_world_of_one_defaults_master() -> None:
    env = resolve_env({"RANK": "0", "WORLD_SIZE": "1"})
    assert (env.launcher, env.master_addr, env.master_port) == ("torchrun", "127.0.0.1", 29500)


def test_torchrun_run_id_becomes_job_id_unless_none() -> None:
    named = resolve_env(torchrun_env(0, 0, 2, 2, 0, TORCHELASTIC_RUN_ID="exp7"))
    default = resolve_env(torchrun_env(0, 0, 2, 2, 0))
    assert (named.job_id, default.job_id) == ("exp7", None)


@pytest.mark.parametrize("marker", ["ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND"])
def test_accelerate_detected_from_its_launcher_variables(marker: str) -> None:
    env = resolve_env(torchrun_env(1, 1, 2, 2, 0, **{marker: "bf16"}))
    assert env.launcher == "accelerate"
    assert (env.rank, env.world_size) == (1, 2)


def test_accelerate_library_variables_alone_do_not_mean_accelerate_launch() -> None:
    # Accelerator(fsdp_plugin=...) writes ACCELERATE_USE_FSDP in-process under plain torchrun.
    env = resolve_env(torchrun_env(0, 0, 2, 2, 0, ACCELERATE_USE_FSDP="true"))
    assert env.launcher == "torchrun"


def test_torchrun_wins_over_slurm() -> None:
    # `srun torchrun --nproc_per_node=4`: SLURM sees one task per node, torchrun the workers.
    environ = slurm_env(procid=1, localid=0, nodeid=1, ntasks=2, nnodes=2, tasks_per_node="1(x2)")
    environ.update(torchrun_env(rank=6, local_rank=2, world=8, lws=4, group_rank=1))
    env = resolve_env(environ)
    assert (env.launcher, env.rank, env.world_size, env.node_rank) == ("torchrun", 6, 8, 1)
    assert env.job_id == "4242"  # the SLURM job id is still the best run identifier


def test_contract_round_trips() -> None:
    env = resolve_env(slurm_env(4, 0, 2, 5, 3, "2(x2),1", nodelist="n[1-3]"))
    contract = env.contract()
    assert contract == {
        "RANK": "4", "LOCAL_RANK": "0", "WORLD_SIZE": "5", "LOCAL_WORLD_SIZE": "1",
        "GROUP_RANK": "2", "GROUP_WORLD_SIZE": "3", "MASTER_ADDR": "n1",
        "MASTER_PORT": str(port_from_job_id("4242", "0")),
    }
    again = resolve_env(contract)
    assert again == DistEnv("torchrun", 4, 0, 5, 1, 2, 3, "n1", env.master_port, None)


# --- SLURM -------------------------------------------------------------------------------


def test_slurm_multi_node() -> None:
    env = resolve_env(slurm_env(procid=5, localid=1, nodeid=1, ntasks=8, nnodes=2,
                                         tasks_per_node="4(x2)"))
    assert env == DistEnv("slurm", 5, 1, 8, 4, 1, 2, "gpu01", port_from_job_id("4242", "0"), "4242")


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("gpu[01-03,07],cpu5", "gpu01"),
        ("node1,node2", "node1"),
        ("n[1-2]-ib", "n1-ib"),
        ("rack[2-3]-gpu[010-011]", "rack2-gpu010"),
        ("single-host", "single-host"),
        ("alpha, host[5-9], gamma", "alpha"),  # spaces after commas, as some tools write them
        ("1.2.3.[089, 100-110]", "1.2.3.089"),  # spaces inside brackets
        ("alpha beta gamma", "alpha"),  # spaces as separators: three hosts, never one name with spaces
    ],
)
def test_slurm_master_addr_is_first_expanded_host(nodelist: str, first: str) -> None:
    env = resolve_env(slurm_env(0, 0, 0, 2, 2, "1(x2)", nodelist=nodelist))
    assert env.master_addr == first


def test_slurm_prefers_step_nodelist_over_job_nodelist() -> None:
    environ = slurm_env(0, 0, 0, 2, 2, "1(x2)", nodelist="a[1-4]", SLURM_STEP_NODELIST="a[3-4]")
    assert resolve_env(environ).master_addr == "a3"


def test_slurm_master_addr_and_port_overrides() -> None:
    environ = slurm_env(0, 0, 0, 2, 2, "1(x2)", MASTER_ADDR="10.1.2.3", MASTER_PORT="23456")
    env = resolve_env(environ)
    assert (env.master_addr, env.master_port) == ("10.1.2.3", 23456)


@pytest.mark.parametrize(
    ("tasks_per_node", "ntasks", "nnodes", "nodeid", "procid", "expected_lws"),
    [
        ("4", 4, 1, 0, 3, 4),
        ("2(x3)", 6, 3, 2, 5, 2),
        ("2(x2),1", 5, 3, 2, 4, 1),
        ("2(x2),1", 5, 3, 1, 3, 2),
        ("3,1(x2)", 5, 3, 0, 0, 3),
    ],
)
def test_slurm_tasks_per_node_forms(
    tasks_per_node: str, ntasks: int, nnodes: int, nodeid: int, procid: int, expected_lws: int
) -> None:
    env = resolve_env(slurm_env(procid, 0, nodeid, ntasks, nnodes, tasks_per_node,
                                         nodelist=f"n[0-{nnodes - 1}]"))
    assert (env.local_world_size, env.num_nodes, env.node_rank) == (expected_lws, nnodes, nodeid)


def test_slurm_step_values_win_over_allocation_values() -> None:
    # Allocation: 2 nodes x 4 tasks; `srun -N1 -n2` step uses one node and two tasks.
    environ = slurm_env(1, 1, 0, 8, 2, "4(x2)", step=False)
    environ.update(SLURM_STEP_ID="3", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="1",
                   SLURM_STEP_TASKS_PER_NODE="2", SLURM_STEP_NODELIST="gpu02")
    env = resolve_env(environ)
    layout = (env.world_size, env.num_nodes, env.local_world_size, env.master_addr)
    assert layout == (2, 1, 2, "gpu02")


def test_slurm_job_num_nodes_fallback() -> None:
    environ = slurm_env(0, 0, 0, 2, 2, "1(x2)", step=True)
    for name in ("SLURM_STEP_NUM_NODES", "SLURM_NNODES"):
        del environ[name]
    assert resolve_env(environ).num_nodes == 2


def test_slurm_without_tasks_per_node_assumes_even_split() -> None:
    environ = slurm_env(5, 1, 2, 6, 3, "2(x3)")
    del environ["SLURM_TASKS_PER_NODE"], environ["SLURM_STEP_TASKS_PER_NODE"]
    assert resolve_env(environ).local_world_size == 2


@pytest.mark.parametrize("marker", ["SUBMITIT_EXECUTOR", "SUBMITIT_FOLDER"])
def test_submitit_detected(marker: str) -> None:
    env = resolve_env(slurm_env(1, 1, 0, 2, 1, "2", nodelist="g1", **{marker: "slurm"}))
    assert env.launcher == "submitit"
    assert (env.rank, env.world_size, env.master_addr) == (1, 2, "g1")


def test_batch_script_with_one_task_is_fine_without_srun() -> None:
    env = resolve_env(slurm_env(0, 0, 0, 1, 1, "1", nodelist="gpu07", step=False))
    assert (env.launcher, env.world_size, env.master_addr) == ("slurm", 1, "gpu07")


def test_batch_script_with_many_tasks_without_srun_is_refused() -> None:
    message = raises_naming(slurm_env(0, 0, 0, 8, 2, "4(x2)", step=False), "SLURM_NTASKS=8", "srun")
    assert "SLURM_STEP_ID" in message


def test_non_numeric_step_id_is_not_an_srun_step() -> None:
    raises_naming(slurm_env(0, 0, 0, 4, 1, "4", step=False, SLURM_STEP_ID="batch"), "srun")


# --- ports and host lists ----------------------------------------------------------------


def test_port_from_job_id_deterministic_and_in_range() -> None:
    ports = [port_from_job_id(str(job)) for job in range(1_000_000, 1_000_500)]
    assert ports == [port_from_job_id(str(job)) for job in range(1_000_000, 1_000_500)]
    assert all(PORT_BASE <= port < PORT_BASE + PORT_SPAN for port in ports)
    assert 1024 < PORT_BASE and PORT_BASE + PORT_SPAN <= 32768  # below the ephemeral range
    assert len(set(ports)) == len(ports)  # consecutive jobs never share a port


def test_port_from_array_job_id() -> None:
    tasks = [port_from_job_id(f"123_{task}") for task in range(50)]
    assert len(set(tasks)) == 50  # sibling array tasks on one node do not collide
    assert port_from_job_id("123_4") == port_from_job_id("123_4")
    assert port_from_job_id("123_4") not in (port_from_job_id("1234"), port_from_job_id("123"))
    assert port_from_job_id("123_4") != port_from_job_id("124_3")
    assert all(PORT_BASE <= port < PORT_BASE + PORT_SPAN for port in tasks)


def test_port_from_job_id_without_digits() -> None:
    with pytest.raises(LaunchError, match="MASTER_PORT"):
        port_from_job_id("abc")


def test_expand_nodelist() -> None:
    assert expand_nodelist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_nodelist("alpha, host[5-6], gamma") == ["alpha", "host5", "host6", "gamma"]
    assert expand_nodelist("1.2.3.[089, 100-101]") == ["1.2.3.089", "1.2.3.100", "1.2.3.101"]
    assert expand_nodelist("alpha beta\tgamma") == ["alpha", "beta", "gamma"]
    assert expand_nodelist("n[1-2]-ib") == ["n1-ib", "n2-ib"]
    assert expand_nodelist(" node1,node2 ") == ["node1", "node2"]


@pytest.mark.parametrize("bad", ["gpu[01-", "x]", "a[3-1]", "", "  "])
def test_expand_nodelist_malformed(bad: str) -> None:
    with pytest.raises(LaunchError, match="node list"):
        expand_nodelist(bad)


def test_malformed_slurm_nodelist_fails_resolution() -> None:
    raises_naming(slurm_env(0, 0, 0, 2, 2, "1(x2)", nodelist="gpu[01-"), "MASTER_ADDR")


# --- inconsistent environments -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [("RANK", "one"), ("WORLD_SIZE", "4.0"), ("LOCAL_RANK", "x"), ("LOCAL_WORLD_SIZE", "?"),
     ("GROUP_RANK", "a"), ("MASTER_PORT", "http")],
)
def test_torchrun_non_integer_names_variable(name: str, value: str) -> None:
    raises_naming(torchrun_env(1, 1, 4, 4, 0, **{name: value}), name, repr(value))


@pytest.mark.parametrize(
    "name",
    ["SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_STEP_NUM_TASKS",
     "SLURM_STEP_NUM_NODES"],
)
def test_slurm_non_integer_names_variable(name: str) -> None:
    raises_naming(slurm_env(0, 0, 0, 2, 2, "1(x2)", **{name: "zero"}), name)


def test_rank_not_below_world_size() -> None:
    raises_naming(torchrun_env(4, 0, 4, 4, 0), "RANK=4", "WORLD_SIZE=4")


def test_negative_rank() -> None:
    raises_naming(torchrun_env(-1, 0, 4, 4, 0), "RANK=-1")


def test_zero_world_size() -> None:
    raises_naming({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0")


def test_local_rank_not_below_local_world_size() -> None:
    raises_naming(torchrun_env(1, 2, 4, 2, 0), "LOCAL_RANK=2", "LOCAL_WORLD_SIZE=2")


def test_world_size_not_multiple_of_local_world_size() -> None:
    environ = torchrun_env(0, 0, 6, 4, 0)
    del environ["GROUP_WORLD_SIZE"]
    raises_naming(environ, "WORLD_SIZE=6", "LOCAL_WORLD_SIZE=4")


def test_local_world_size_larger_than_world() -> None:
    environ = torchrun_env(0, 0, 2, 4, 0)
    environ["GROUP_WORLD_SIZE"] = "1"
    raises_naming(environ, "LOCAL_WORLD_SIZE=4", "WORLD_SIZE=2")


def test_node_rank_not_below_num_nodes() -> None:
    raises_naming(torchrun_env(5, 1, 8, 4, 2), "GROUP_RANK=2", "GROUP_WORLD_SIZE=2")


def test_rank_without_world_size() -> None:
    raises_naming({"RANK": "0"}, "RANK", "WORLD_SIZE")


@pytest.mark.parametrize("missing", ["MASTER_ADDR", "MASTER_PORT"])
def test_multi_process_torchrun_needs_master(missing: str) -> None:
    environ = torchrun_env(0, 0, 2, 2, 0)
    del environ[missing]
    raises_naming(environ, missing, "WORLD_SIZE=2")


@pytest.mark.parametrize("port", ["0", "70000", "-5"])
def test_master_port_out_of_range(port: str) -> None:
    raises_naming(torchrun_env(0, 0, 2, 2, 0, MASTER_PORT=port), f"MASTER_PORT={port}")


def test_slurm_ntasks_disagrees_with_tasks_per_node_sum() -> None:
    environ = slurm_env(0, 0, 0, 8, 2, "4(x2)", step=False)
    environ["SLURM_NTASKS"], environ["SLURM_STEP_ID"] = "7", "0"
    raises_naming(environ, "SLURM_NTASKS=7", "SLURM_TASKS_PER_NODE", "8")


def test_slurm_step_tasks_disagree() -> None:
    environ = slurm_env(0, 0, 0, 8, 2, "4(x2)", SLURM_STEP_TASKS_PER_NODE="4,3")
    raises_naming(environ, "SLURM_STEP_NUM_TASKS=8", "SLURM_STEP_TASKS_PER_NODE")


def test_slurm_tasks_per_node_lists_wrong_node_count() -> None:
    environ = slurm_env(0, 0, 0, 6, 2, "2(x3)")
    raises_naming(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_STEP_NUM_NODES=2")


def test_slurm_malformed_tasks_per_node() -> None:
    raises_naming(slurm_env(0, 0, 0, 4, 2, "2x2"), "SLURM_STEP_TASKS_PER_NODE", "'2x2'")


def test_slurm_node_id_not_below_num_nodes() -> None:
    raises_naming(slurm_env(0, 0, 2, 4, 2, "2(x2)"), "SLURM_NODEID=2", "SLURM_STEP_NUM_NODES=2")


def test_slurm_local_id_not_below_tasks_on_node() -> None:
    raises_naming(slurm_env(2, 2, 0, 4, 2, "2(x2)"), "SLURM_LOCALID=2", "SLURM_STEP_TASKS_PER_NODE")


def test_slurm_procid_not_below_ntasks() -> None:
    raises_naming(slurm_env(4, 1, 1, 4, 2, "2(x2)"), "SLURM_PROCID=4", "SLURM_STEP_NUM_TASKS=4")


def test_slurm_missing_localid() -> None:
    environ = slurm_env(0, 0, 0, 2, 2, "1(x2)")
    del environ["SLURM_LOCALID"]
    raises_naming(environ, "SLURM_LOCALID", "srun")


def test_slurm_uneven_split_without_tasks_per_node() -> None:
    environ = slurm_env(0, 0, 0, 5, 2, "3,2")
    del environ["SLURM_TASKS_PER_NODE"], environ["SLURM_STEP_TASKS_PER_NODE"]
    raises_naming(environ, "SLURM_STEP_NUM_TASKS=5", "SLURM_STEP_NUM_NODES=2")


# --- devices -----------------------------------------------------------------------------


def _node_env(lws: int, launcher: str = "torchrun") -> DistEnv:
    return DistEnv(launcher, 0, 0, lws * 2, lws, 0, 2, "h", 1234)


@pytest.mark.parametrize(("lws", "gpus"), [(4, 4), (2, 8), (1, 1)])
def test_check_devices_enough_gpus(lws: int, gpus: int) -> None:
    assert check_devices(_node_env(lws), gpus) is None


def test_check_devices_too_many_local_ranks() -> None:
    with pytest.raises(LaunchError) as info:
        check_devices(_node_env(8), 4)
    message = str(info.value)
    for needle in ("8 local ranks", "4 GPU", "--nproc_per_node=4", "--ntasks-per-node=4"):
        assert needle in message
    assert "dist.device=cpu" in message


def test_check_devices_no_gpu() -> None:
    with pytest.raises(LaunchError, match="dist.device=cpu"):
        check_devices(_node_env(1), 0)


# --- properties and purity ---------------------------------------------------------------


def test_dist_env_is_frozen() -> None:
    env = resolve_env({})
    with pytest.raises(AttributeError):
        env.rank = 1  # type: ignore[misc]


def test_launch_error_is_value_error() -> None:
    assert issubclass(LaunchError, ValueError)


def test_module_does_not_import_torch() -> None:
    code = "import sys, launcher.env; sys.exit('torch' in sys.modules)"
    repo = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=repo, check=False).returncode == 0


def test_concurrent_srun_steps_of_one_job_get_different_ports() -> None:
    step0 = resolve_env(slurm_env(0, 0, 0, 2, 1, "2"))
    step1 = resolve_env({**slurm_env(0, 0, 0, 2, 1, "2"), "SLURM_STEP_ID": "1"})
    assert step0.master_port != step1.master_port
    assert step0.master_port == resolve_env(slurm_env(1, 1, 0, 2, 1, "2")).master_port, "ranks agree"
    assert port_from_job_id("123", "4") != port_from_job_id("123_4")


def test_submitit_local_executor_tasks() -> None:
    env = resolve_env({"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1",
                                "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_JOB_ID": "4242"})
    assert (env.launcher, env.rank, env.local_rank, env.world_size, env.num_nodes) == ("submitit", 1, 1, 2, 1)
    assert env.master_addr == "127.0.0.1" and env.master_port == port_from_job_id("4242")


def test_submitit_local_rank_outside_the_world_is_an_error() -> None:
    with pytest.raises(LaunchError, match="SUBMITIT_LOCAL_GLOBALID=2 is outside"):
        resolve_env({"SUBMITIT_LOCAL_GLOBALID": "2", "SUBMITIT_LOCAL_LOCALID": "0",
                              "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_JOB_ID": "1"})

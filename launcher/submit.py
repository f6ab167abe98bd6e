"""``python -m launcher submit``: send a training module to SLURM (or run it locally) through submitit.

    python -m launcher submit --tasks-per-node 2 --time 60 -m trainers.cifar --config configs/cifar.yaml

Every task of the job runs the module's ``main(argv)`` in submitit's process and finds its rank
through ``launcher.env`` like any other SLURM task. The run directory is fixed by the job id (or
``run.dir``), so a requeued job resumes where it stopped.

Preemption and time limits: SLURM sends the ranks submitit's signal (USR2, ``slurm.signal_delay_s``
before the limit) or SIGTERM. The trainer's own handler only sets a flag; all ranks stop at the same
step and rank 0 checkpoints. Only then does :class:`TrainJob` hand the signal to the handler submitit
had installed, which requeues the job (counting time-limit requeues against
``slurm.max_timeout_requeues``). A signal that arrives before the trainer took over reaches submitit's
handler directly: it requeues too, and the next run resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from launcher.config import SlurmConfig
from launcher.errors import UserError
from launcher.signals import PREEMPTED_EXIT_CODE, STOP_SIGNALS, last_stop_signal

#: How often ``--wait`` asks SLURM whether the job still exists, and how often it looks at a local job (a process of
#: this machine: asking costs nothing, so ``--local --wait`` returns as soon as the job ends).
POLL_S = 2.0
LOCAL_POLL_S = 0.1


class SubmitError(UserError):
    """The submission cannot be made as asked; the message says what to change."""

    same_on_every_rank = True


class TrainingFailed(RuntimeError):
    """Raised in the job when training ended with a non-zero status other than "stopped to be requeued"."""


# --------------------------------------------------------------------------------- the job itself


@dataclass
class TrainJob:
    """What every task of a submitted job runs: ``module.main(argv + ["run.dir=..."])``.

    ``run_dir`` may contain ``{job_id}`` (the SLURM job id, ``<array id>_<index>`` in arrays), which
    stays the same across requeues.
    """

    module: str
    argv: list[str]
    run_dir: str

    def __call__(self) -> str:
        import submitit

        run_dir = self.run_dir.format(job_id=submitit.JobEnvironment().job_id)
        # submitit's handlers (checkpoint-and-requeue on its signal, log-only on SIGTERM): the trainer
        # replaces them while it runs, and they are called again below once the checkpoint is written.
        theirs = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        try:
            code = self._run([*self.argv, f"run.dir={run_dir}"])
        finally:
            for sig, handler in theirs.items():
                signal.signal(sig, handler)
        if code == PREEMPTED_EXIT_CODE:
            self._hand_over(theirs)
        if code != 0:
            raise TrainingFailed(f"{self.module} ended with exit status {code}; its message is above in this log")
        return run_dir

    def _run(self, argv: list[str]) -> int:
        main: Callable[[list[str]], int] = importlib.import_module(self.module).main
        try:
            return main(argv)
        except SystemExit as e:
            if e.code in (None, 0, PREEMPTED_EXIT_CODE):  # a module that exits itself; a stop during start-up
                return int(e.code or 0)
            raise  # e.g. submitit's handler requeueing the job: let it end this attempt

    @staticmethod
    def _hand_over(theirs: dict[signal.Signals, Any]) -> None:
        """The checkpoint is on disk: let submitit act on the signal that stopped us (rank 0 requeues;
        after too many time-limit requeues it ends the job instead), then leave without a result, so the
        job counts as unfinished until a requeued run completes."""
        import submitit

        preempt = submitit.JobEnvironment._usr_sig()
        received = last_stop_signal()
        sig = preempt if received is None or received == signal.SIGINT else received
        handler = theirs.get(sig)
        if callable(handler):
            handler(sig, None)  # submitit's: may requeue and sys.exit, or raise "timed-out too many times"
        raise SystemExit(PREEMPTED_EXIT_CODE)

    def checkpoint(self) -> Any:
        """Called by submitit when it requeues the job: the same job again (it resumes from its run directory)."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.module, self.argv, self.run_dir))


# ----------------------------------------------------------------------------- the command line


#: What the job asks SLURM for: the ``slurm:`` section of the config with the flags applied.
Resources = SlurmConfig


def ranks_per_node(res: Resources) -> int:
    """One rank per GPU unless ``tasks_per_node`` says otherwise; one without GPUs."""
    return res.tasks_per_node or res.gpus_per_node or 1


#: flag -> Resources field; flags that are given win over the config's ``slurm:`` section.
_FLAGS: dict[str, tuple[str, type, str]] = {
    "--nodes": ("nodes", int, "nodes to allocate"),
    "--tasks-per-node": ("tasks_per_node", int, "ranks per node (default: --gpus-per-node, or 1 without GPUs)"),
    "--gpus-per-node": ("gpus_per_node", int, "GPUs per node"),
    "--cpus-per-task": ("cpus_per_task", int, "cores per rank"),
    "--mem": ("mem", str, "memory per node, e.g. 64G"),
    "--time": ("time_min", int, "wall-clock limit in MINUTES (default 60)"),
    "--partition": ("partition", str, "partition"),
    "--account": ("account", str, "account to charge"),
    "--qos": ("qos", str, "quality of service"),
    "--constraint": ("constraint", str, "node features, e.g. a100"),
    "--job-name": ("job_name", str, "job name (default: the run's name)"),
    "--max-timeout-requeues": ("max_timeout_requeues", int, "time-limit requeues before giving up (default 3; "
                               "preemptions are not counted)"),
    "--log-dir": ("log_dir", str, "where submitit writes logs and pickles (default runs/submitit)"),
}


def add_parser(commands: Any) -> None:
    """The ``submit`` subcommand of ``python -m launcher``."""
    p = commands.add_parser(
        "submit", help="submit a training module to SLURM through submitit (or run it locally)",
        description="Submit `python -m MODULE [--config FILE] [key=value ...]` to SLURM, one task per rank. "
        "Defaults come from the config's `slurm:` section; flags win. A key given several values "
        "(optim.lr=0.1,0.2) submits a job array, one run directory each.",
        epilog="examples:\n  python -m launcher submit --nodes 2 --gpus-per-node 8 --time 240 -m trainers.cifar "
        "--config configs/cifar.yaml\n  python -m launcher submit --local --wait -m trainers.cifar --config "
        "configs/cifar_debug.yaml\n  python -m launcher submit --dry-run -m trainers.cifar optim.lr=0.05,0.1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, (_, kind, doc) in _FLAGS.items():
        p.add_argument(flag, type=kind, default=None, help=doc)
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --sbatch exclude=node7 (repeatable)")
    p.add_argument("--local", action="store_true", help="run the job on this machine with submitit's local "
                   "executor instead of SLURM")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and submit nothing")
    p.add_argument("--wait", action="store_true", help="block until the job(s) end; exit 0 only if training "
                   "finished")
    p.add_argument("-m", dest="module", required=True, metavar="MODULE", help="training module with a "
                   "main(argv) function, e.g. trainers.cifar or your own")
    p.add_argument("--config", type=Path, default=None, help="YAML config file of the module")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",
                   help="config overrides; a,b,c values make a job array")


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """``["optim.lr=0.1,0.2", "train.epochs=3"]`` -> one override list per combination (a job array).

    A value in brackets or quotes (a YAML list such as ``[0.9,0.95]``) is one value, not a sweep.
    """
    choices: list[list[str]] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and "," in value and value[:1] not in "[{'\"":
            choices.append([f"{key}={v}" for v in value.split(",")])
        else:
            choices.append([item])
    return [list(combo) for combo in itertools.product(*choices)]


def resolved_config(module: str, config: Path | None, overrides: Sequence[str]) -> dict[str, Any]:
    """The module's own check of the config (``--print-config``), here before anything is queued."""
    cmd = [sys.executable, "-m", module, *(["--config", str(config)] if config else []), *overrides, "--print-config"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip()).splitlines()
        last = message[-1] if message else f"exit status {done.returncode}"
        if "No module named" in last:
            raise SubmitError(f"nothing was submitted: -m {module} cannot be imported ({last}); give a module path "
                              f"such as trainers.cifar, importable from this directory.")
        raise SubmitError(f"nothing was submitted: `python -m {module}` refuses this configuration: "
                          f"{last.removeprefix('error: ')}")
    parsed = yaml.safe_load(done.stdout)
    if not isinstance(parsed, dict):
        raise SubmitError(f"nothing was submitted: `python -m {module} --print-config` printed no configuration; a "
                          f"module for submit needs main(argv) and must call it under `if __name__ == \"__main__\":` "
                          f"(see trainers/cifar.py).")
    return parsed


def resources(args: argparse.Namespace, slurm: dict[str, Any]) -> Resources:
    """The config's ``slurm:`` values, then every flag that was given."""
    known = {f.name for f in fields(Resources)}
    values: dict[str, Any] = {k: tuple(v) if k == "sbatch" else v for k, v in slurm.items() if k in known}
    for flag, (name, _, _) in _FLAGS.items():
        given = getattr(args, flag.lstrip("-").replace("-", "_"))
        if given is not None:
            values[name] = given
    if args.sbatch:
        values["sbatch"] = (*values.get("sbatch", ()), *args.sbatch)
    res = Resources(**values)
    bad = [o for o in res.sbatch if "=" not in o]
    if bad:
        raise SubmitError(f"--sbatch {bad[0]!r} is not KEY=VALUE; write e.g. --sbatch exclude=node7.")
    if res.nodes < 1 or res.time_min < 1:
        raise SubmitError(f"--nodes ({res.nodes}) and --time ({res.time_min} minutes) must be at least 1.")
    return res


def executor_for(res: Resources, local: bool, name: str) -> Any:
    """A submitit executor asking for ``res``: SLURM's, or the local one (``--local``)."""
    import submitit

    folder = Path(res.log_dir).absolute() / "%j"
    if local:
        ex: Any = submitit.LocalExecutor(folder=folder, max_num_timeout=res.max_timeout_requeues)
        ex.update_parameters(tasks_per_node=ranks_per_node(res), nodes=1, timeout_min=res.time_min,
                             gpus_per_node=res.gpus_per_node, signal_delay_s=res.signal_delay_s)
        return ex
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=res.max_timeout_requeues)
    extra: dict[str, Any] = dict(option.split("=", 1) for option in res.sbatch)
    extra.setdefault("requeue", True)  # preempted jobs return to the queue (clusters may default to no-requeue)
    extra.setdefault("chdir", str(Path.cwd()))  # the module and relative paths resolve as they did here
    params: dict[str, Any] = {
        "nodes": res.nodes, "ntasks_per_node": ranks_per_node(res), "time": res.time_min,
        "job_name": res.job_name or name, "signal_delay_s": res.signal_delay_s, "stderr_to_stdout": True,
        "additional_parameters": extra,
        # one rank per task: a task's cores go to its data loading and intra-op threads
        "setup": [f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{res.cpus_per_task or 1}}}"],
    }
    optional = {"gpus_per_node": res.gpus_per_node, "cpus_per_task": res.cpus_per_task, "mem": res.mem,
                "partition": res.partition, "account": res.account, "qos": res.qos, "constraint": res.constraint}
    params.update({k: v for k, v in optional.items() if v})
    ex.update_parameters(**params)
    return ex


@dataclass
class Plan:
    """Everything one ``submit`` call sends: the jobs (one per sweep point) and how to run them."""

    module: str
    base_argv: list[str]
    sweeps: list[list[str]]
    res: Resources
    name: str
    run_dirs: list[str] = field(default_factory=list)

    def jobs(self) -> list[TrainJob]:
        return [TrainJob(self.module, [*self.base_argv, *sweep], run_dir) for sweep, run_dir in
                zip(self.sweeps, self.run_dirs)]


def plan(args: argparse.Namespace) -> Plan:
    """Check every configuration of the submission and fix the run directories."""
    overrides = [o for o in args.overrides if o != "--"]
    ours = {*_FLAGS, "--sbatch", "--local", "--dry-run", "--wait"}
    misplaced = [o for o in overrides if o.split("=", 1)[0] in ours]
    if misplaced:
        raise SubmitError(f"{misplaced[0]} is an option of submit, but it comes after -m {args.module}, where "
                          f"everything goes to the module; put it before -m.")
    sweeps = expand_sweep(overrides)
    configs = [resolved_config(args.module, args.config, sweep) for sweep in sweeps]
    first = configs[0]
    res = resources(args, first.get("slurm") or {})
    run = first.get("run") or {}
    name = run.get("name") or args.module.rsplit(".", 1)[-1]
    base = ["--config", str(Path(args.config).absolute())] if args.config else []
    p = Plan(args.module, base, sweeps, res, name)
    for i, (cfg, sweep) in enumerate(zip(configs, sweeps)):
        given = (cfg.get("run") or {}).get("dir") if _run_dir_given(args.config, sweep) else None
        if given:
            p.run_dirs.append(str(Path(given).absolute() / str(i)) if len(configs) > 1 else str(Path(given).absolute()))
        else:
            p.run_dirs.append(str(Path.cwd() / "runs" / f"{name}-{{job_id}}"))
    return p


def _run_dir_given(config: Path | None, overrides: Sequence[str]) -> bool:
    """Whether the user named run.dir (--print-config shows the run directory either way: a default one is
    replaced by ``runs/<name>-<job id>`` here, fixed by the job id so that every requeue finds it)."""
    if any(o.strip().startswith("run.dir=") for o in overrides):
        return True
    if config is None:
        return False
    data = yaml.safe_load(Path(config).read_text()) or {}
    return bool(isinstance(data, dict) and isinstance(data.get("run"), dict) and data["run"].get("dir"))


def dry_run_script(p: Plan, local: bool) -> str:
    """The sbatch script the submission would write (submitit's own generator), with its placeholders."""
    if local:
        return f"# --local: {ranks_per_node(p.res)} task(s) on this machine, no sbatch script\n"
    ex = executor_for(p.res, local=False, name=p.name)
    if len(p.sweeps) > 1:
        ex.parameters["map_count"] = len(p.sweeps)
    script = str(ex._make_submission_file_text(ex._submitit_command_str, "<uuid>"))
    if len(p.sweeps) == 1:
        return script
    rows = [f"#   index {i}: {' '.join(sweep) or '(no overrides)'} -> {run_dir.format(job_id=f'<array id>_{i}')}"
            for i, (sweep, run_dir) in enumerate(zip(p.sweeps, p.run_dirs))]
    return script + f"\n# job array of {len(p.sweeps)} jobs, one run directory each:\n" + "\n".join(rows) + "\n"


def _describe(job: Any, tj: TrainJob) -> str:
    run_dir = tj.run_dir.format(job_id=job.job_id)
    return f"job {job.job_id}: run directory {run_dir}\n    log: {job.paths.stdout}"


def _slurm_job_alive(job_id: str) -> bool:
    """True while SLURM still lists the job (running, pending, or requeued and waiting to start)."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    return out.returncode == 0 and bool(out.stdout.strip())


def wait_for(jobs: Sequence[Any], local: bool) -> int:
    """Block until every job ended; 0 if all finished training, else the first failure's status.

    squeue, not sacct: many clusters (and the local test cluster) run without accounting.
    """
    status = 0
    for job in jobs:
        while not _ended(job, local):
            time.sleep(LOCAL_POLL_S if local else POLL_S)
        status = status or _outcome(job)
    return status


def _ended(job: Any, local: bool) -> bool:
    """A local job has its own answer; a SLURM job ended once every task left a result, or SLURM forgot it."""
    if local:
        return bool(job.done())
    every_task_answered = all(p.result_pickle.exists() for p in _task_paths(job))
    return every_task_answered or not _slurm_job_alive(str(job.job_id))


def _task_paths(job: Any) -> list[Any]:
    return [sub.paths for sub in job._sub_jobs] if job._sub_jobs else [job.paths]


def _outcome(job: Any) -> int:
    rank0 = _task_paths(job)[0].result_pickle
    for _ in range(10):  # the pickle may lag the job's end on a networked file system
        if rank0.exists():
            break
        time.sleep(0.5)
    if not rank0.exists():
        print(f"job {job.job_id} ended without a result (cancelled, killed, or out of time-limit requeues); "
              f"see {job.paths.stdout}", file=sys.stderr)
        return 1
    outcome, value = job.task(0)._get_outcome_and_result() if job._sub_jobs else job._get_outcome_and_result()
    if outcome == "success":
        print(f"job {job.job_id}: finished{_final_metrics(Path(value))} ({value})")
        return 0
    found = re.search(r"exit status (\d+)", str(value))
    print(f"job {job.job_id} failed; see {job.paths.stdout}", file=sys.stderr)
    return int(found.group(1)) if found else 1


def _final_metrics(run_dir: Path) -> str:
    """``: step 32, test_acc 0.9440 test_loss 0.2100`` from the run's end record (empty when it has none)."""
    from launcher.report import load_run  # matplotlib-free until a plot is asked for

    try:
        end = load_run(run_dir).end
    except UserError:
        return ""
    if end is None:
        return ""
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in end.items() if k.startswith("test_") and isinstance(v, float))
    return f": step {end['step']}, {metrics}"


def submit(args: argparse.Namespace) -> int:
    p = plan(args)
    if args.dry_run:
        print(dry_run_script(p, args.local), end="")
        return 0
    ex = executor_for(p.res, args.local, p.name)
    tjobs = p.jobs()
    jobs = ex.submit_array(tjobs) if len(tjobs) > 1 else [ex.submit(tjobs[0])]
    placeholder = Path(p.res.log_dir).absolute() / "%j"  # the local executor creates its folder pattern literally
    if placeholder.is_dir() and not any(placeholder.iterdir()):
        placeholder.rmdir()
    where = "locally" if args.local else "to SLURM"
    print(f"submitted {len(jobs)} job(s) {where}, {p.res.nodes} node(s) x {ranks_per_node(p.res)} rank(s) each:")
    for job, tj in zip(jobs, tjobs):
        print("  " + _describe(job, tj))
    if not args.wait:
        follow = "tail -f " + str(jobs[0].paths.stdout)
        print(f"follow with: {follow}")
        return 0
    return wait_for(jobs, args.local)

"""The order in which test files start: the longest first.

``make test`` hands whole files to parallel workers in collection order (pytest-xdist ``--dist loadfile
--no-loadscope-reorder``). Started last, a file of a few minutes leaves the other workers idle at the end; started
first, it runs while they work through the short files. xdist's own order (most tests first) puts the slowest files,
which have few long tests, at the very end.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

# One thread per process, set before anything imports torch: make test runs TEST_WORKERS files at once, one worker
# per 2 cores, and most tests start 2 ranks. A second thread's gain is small at these sizes, and when the other core
# is busy, its OpenMP barriers spin: the gpu_check smoke took 99 core-s with 2 threads against another busy core,
# 63 with one. Subprocesses inherit it; the few tests that compare thread counts set theirs explicitly.
os.environ.setdefault("OMP_NUM_THREADS", "1")

#: Test files by their time in a parallel run on 2 cores (seconds, measured; update when a file's time changes a
#: lot). Files not listed are short and keep their place after these.
SLOWEST_FIRST = {
    "test_slurm.py": 200, "test_chaos.py": 155, "test_user_view.py": 125, "test_submit.py": 120, "test_resume.py": 115,
    "test_bench.py": 105, "test_fsdp.py": 105, "test_lm.py": 70, "test_launch.py": 70, "test_task_api.py": 65,
    "test_imagefolder.py": 40, "test_two_hosts.py": 25, "test_equivalence.py": 20, "test_auto.py": 13,
    "test_nonfinite.py": 7, "test_syncbn.py": 5, "test_cifar_data.py": 4, "test_checkpoint.py": 4, "test_config.py": 4,
    "test_amp.py": 3,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Stable sort by file cost, so the tests of one file keep their order."""
    items.sort(key=lambda item: -SLOWEST_FIRST.get(item.path.name, 0))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """After a full run, the CPU cost of one fresh torch process here (what most tests pay at least once): the same
    suite's time moves with the machine's speed (7 to 11 minutes on 2-core machines of one kind), and this figure
    tells a slow machine from a slow suite."""
    if hasattr(terminalreporter.config, "workerinput"):
        return  # an xdist worker: its summary is not shown, and the controller measures once for the run
    ran = sum(len(terminalreporter.stats.get(kind, [])) for kind in ("passed", "failed", "skipped"))
    if ran < 100:
        return
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", "import torch._dynamo"], check=False, timeout=120,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    terminalreporter.write_line(f"machine speed: a fresh process importing torch and torch._dynamo took {cpu:.1f} s "
                                "of CPU here (compare suite times across machines with it)")

"""Checkpoints never lose work: atomic saves, retention, corruption fallback, crash mid-save, safe loads."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainers.core.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from trainers.core.files import atomic_write_text
from trainers.core.parallel import strip_prefixes
from trainers.core.rng import rng_state, set_rng_state

REPO = Path(__file__).resolve().parents[1]


class Log(list):
    """A ``log`` callable that remembers its lines."""

    def __call__(self, line: str) -> None:
        self.append(line)


def manager(tmp_path: Path, **kw: Any) -> tuple[CheckpointManager, Log]:
    log = Log()
    return CheckpointManager(tmp_path / "checkpoints", log=log, **kw), log


def state_for(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(64, 64, generator=g), "step": step}


def steps(mgr: CheckpointManager) -> list[int]:
    return [int(p.stem.split("-")[1]) for p in mgr.list()]


def flip_middle(path: Path, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ------------------------------------------------------------------------------------- round trip


def test_round_trip_preserves_nested_state_and_pointer_names_newest(tmp_path: Path) -> None:
    mgr, log = manager(tmp_path)
    state = {
        "model": {"layer.weight": torch.randn(3, 4), "layer.bias": torch.zeros(3, dtype=torch.float16)},
        "counters": {"epoch": 2, "lr": 0.1, "done": False, "note": None, "name": "run"},
        "history": [1, 2.5, (3, "x")],
        "python_rng": random.getstate(),  # a tuple of ints nested in a tuple
    }
    for step in (1, 2, 3):
        mgr.save({**state, "step": step}, step)

    assert (mgr.directory / "latest").read_text().strip() == "step-00000003.pt"
    assert mgr.latest_path() == mgr.directory / "step-00000003.pt"
    loaded, path = mgr.load_latest()
    assert path.name == "step-00000003.pt" and loaded["step"] == 3
    assert torch.equal(loaded["model"]["layer.weight"], state["model"]["layer.weight"])
    assert loaded["model"]["layer.bias"].dtype == torch.float16
    assert loaded["counters"] == state["counters"]
    assert loaded["history"] == [1, 2.5, (3, "x")]
    assert loaded["python_rng"] == state["python_rng"] and isinstance(loaded["python_rng"], tuple)
    random.setstate(loaded["python_rng"])  # must be accepted as-is after a weights_only load
    assert log == []


def test_manifest_records_name_step_metric_and_hash(tmp_path: Path) -> None:
    mgr, _ = manager(tmp_path)
    mgr.save(state_for(7), 7, metric=0.5)
    entries = json.loads((mgr.directory / "manifest.json").read_text())["checkpoints"]
    assert [(e["file"], e["step"], e["metric"]) for e in entries] == [("step-00000007.pt", 7, 0.5)]
    assert len(entries[0]["sha256"]) == 64


def test_pointer_is_tried_before_newer_files(tmp_path: Path) -> None:
    mgr, _ = manager(tmp_path)
    for step in (1, 2, 3):
        mgr.save(state_for(step), step)
    atomic_write_text(mgr.directory / "latest", "step-00000002.pt\n")
    assert mgr.load_latest()[0]["step"] == 2


# ------------------------------------------------------------------------------------- retention


def test_retention_keeps_newest_plus_best(tmp_path: Path) -> None:
    mgr, _ = manager(tmp_path, keep_last=2)
    for step, metric in zip(range(1, 6), [0.5, 0.9, 0.1, 0.2, 0.3]):
        mgr.save(state_for(step), step, metric)
    assert steps(mgr) == [2, 4, 5]  # newest two, plus step 2: the best although it is the oldest left
    assert mgr.best_path() == mgr.directory / "step-00000002.pt"
    # The manifest forgets pruned files.
    names = [e["file"] for e in json.loads((mgr.directory / "manifest.json").read_text())["checkpoints"]]
    assert names == ["step-00000002.pt", "step-00000004.pt", "step-00000005.pt"]


def test_best_survives_many_later_saves(tmp_path: Path) -> None:
    mgr, _ = manager(tmp_path, keep_last=1)
    mgr.save(state_for(1), 1, metric=0.99)
    for step in range(2, 8):
        mgr.save(state_for(step), step, metric=0.1 * step / 10)
    assert steps(mgr) == [1, 7]


def test_without_keep_best_or_metrics_only_newest_are_kept(tmp_path: Path) -> None:
    mgr, _ = manager(tmp_path / "a", keep_last=2, keep_best=False)
    for step, metric in zip(range(1, 6), [0.5, 0.9, 0.1, 0.2, 0.3]):
        mgr.save(state_for(step), step, metric)
    assert steps(mgr) == [4, 5]

    mgr, _ = manager(tmp_path / "b", keep_last=2)
    for step in range(1, 6):
        mgr.save(state_for(step), step, metric=None if step != 3 else float("nan"))
    assert steps(mgr) == [4, 5]  # None and NaN never count as best
    assert mgr.best_path() is None


def test_saving_same_step_twice_replaces_it(tmp_path: Path) -> None:
    mgr, log = manager(tmp_path)
    mgr.save({"v": torch.tensor([1.0])}, 4)
    mgr.save({"v": torch.tensor([2.0])}, 4)
    assert steps(mgr) == [4]
    state, _ = mgr.load_latest()
    assert state["v"].item() == 2.0
    assert log == []  # the manifest hash is the new file's, so nothing was rejected
    assert len(json.loads((mgr.directory / "manifest.json").read_text())["checkpoints"]) == 1


def test_failed_save_leaves_previous_checkpoint_and_no_debris(tmp_path: Path) -> None:
    mgr, _ = manager(tmp_path)
    mgr.save(state_for(1), 1)
    with pytest.raises(Exception):
        mgr.save({"bad": lambda: None}, 2)  # lambdas cannot be pickled
    assert sorted(p.name for p in mgr.directory.iterdir()) == ["latest", "manifest.json", "step-00000001.pt"]
    assert mgr.load_latest()[0]["step"] == 1


# ------------------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("damage, why", [(truncate_half, "truncated"), (flip_middle, "hash mismatch")])
def test_corrupt_newest_falls_back_to_previous(tmp_path: Path, damage: Any, why: str) -> None:
    mgr, log = manager(tmp_path)
    for step in (1, 2):
        mgr.save(state_for(step), step)
    damage(mgr.directory / "step-00000002.pt")

    state, path = mgr.load_latest()
    assert path.name == "step-00000001.pt"
    assert torch.equal(state["w"], state_for(1)["w"])
    assert len(log) == 1
    assert "step-00000002.pt" in log[0] and why in log[0] and "step-00000001.pt" in log[0]


def test_all_corrupt_raises_with_directory_and_fix(tmp_path: Path) -> None:
    mgr, _ = manager(tmp_path)
    for step in (1, 2):
        mgr.save(state_for(step), step)
    truncate_half(mgr.directory / "step-00000002.pt")
    flip_middle(mgr.directory / "step-00000001.pt")
    with pytest.raises(CheckpointError) as info:
        mgr.load_latest()
    msg = str(info.value)
    assert str(mgr.directory) in msg and "step-00000001.pt" in msg and "step-00000002.pt" in msg
    assert "checkpoint.resume" in msg and "checkpoint.resume=never" in msg


def test_no_checkpoints_means_fresh_run(tmp_path: Path) -> None:
    mgr, _ = manager(tmp_path)
    assert mgr.load_latest() is None and mgr.latest_path() is None and mgr.list() == []
    mgr.directory.mkdir()
    (mgr.directory / ".step-00000001.pt.tmp-123").write_bytes(b"partial")  # a crash in the first save
    assert mgr.load_latest() is None


# ------------------------------------------------------------------------------------- crash mid-save

_CHILD = """
import sys, torch
from trainers.core.checkpoint import CheckpointManager
mgr = CheckpointManager(sys.argv[1], log=lambda line: None)
big = {"big": torch.ones(50_000_000)}  # 200 MB: the save takes long enough to be caught mid-write
step = 2
while True:
    mgr.save(big, step)
    step += 1
"""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def _wait_for_partial(path: Path, proc: subprocess.Popen, log_file: Path, timeout_s: float) -> None:
    """Return once ``path`` holds some data (a save is mid-write); fail if that does not happen in time."""
    deadline = time.monotonic() + timeout_s
    while _size(path) < 2**20:
        if proc.poll() is not None:
            pytest.fail(f"saving subprocess exited ({proc.returncode}) before {path.name} was being written:\n"
                        f"{log_file.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name} was not being written within {timeout_s}s:\n{log_file.read_text()}")
        time.sleep(0.001)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_during_save_keeps_previous_checkpoint(tmp_path: Path) -> None:
    mgr, log = manager(tmp_path)
    mgr.save(state_for(1), 1)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log_file = tmp_path / "child.log"
    with open(log_file, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(mgr.directory)], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        tmp = mgr.directory / f".step-00000002.pt.tmp-{proc.pid}"
        _wait_for_partial(tmp, proc, log_file, timeout_s=120)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)

    assert _size(tmp) > 0, "the kill should have landed while the temp file was being written"
    assert steps(mgr) == [1], "the interrupted save must not have produced a checkpoint file"
    state, path = mgr.load_latest()
    assert path.name == "step-00000001.pt" and torch.equal(state["w"], state_for(1)["w"])
    assert log == []  # nothing to reject: the half-written file never had a checkpoint name

    mgr.save(state_for(3), 3)
    assert not tmp.exists()
    assert any(tmp.name in line for line in log)
    assert steps(mgr) == [1, 3] and mgr.load_latest()[1].name == "step-00000003.pt"


# ------------------------------------------------------------------------------------- helpers


def test_strip_prefixes_handles_ddp_compile_and_both() -> None:
    sd = {"module.a": 1, "_orig_mod.b": 2, "module._orig_mod.c": 3, "_orig_mod.module.d": 4,
          "module.module.e": 5, "encoder.module.f": 6}
    assert strip_prefixes(sd) == {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "encoder.module.f": 6}
    with pytest.raises(ValueError, match="collide"):
        strip_prefixes({"module.w": 1, "w": 2})


def test_stripped_wrapped_state_dict_loads_into_bare_model() -> None:
    bare = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    wrapped = torch.nn.Module()
    wrapped.module = torch.nn.Module()
    wrapped.module._orig_mod = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    sd = strip_prefixes(wrapped.state_dict())
    bare.load_state_dict(sd)  # strict: every key must match
    assert torch.equal(bare[0].weight, wrapped.module._orig_mod[0].weight)
    assert sd._metadata["1"] == {"version": 2}  # BatchNorm's version survives under the new name


# Unpickling a Payload calls _record_execution: proof of whether a load ran code from the file.
EXECUTED: list[str] = []


def _record_execution(tag: str) -> str:
    EXECUTED.append(tag)
    return tag


class Payload:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_record_execution, ("code from the checkpoint ran",))


def test_load_checkpoint_refuses_pickled_objects_without_running_them(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Payload()}, path)
    EXECUTED.clear()
    with pytest.raises(CheckpointError, match="weights_only") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and EXECUTED == []
    torch.load(path, weights_only=False)  # control: an unrestricted load would have run it
    assert EXECUTED == ["code from the checkpoint ran"]


def test_load_checkpoint_missing_or_truncated_names_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_checkpoint(tmp_path / "nope.pt")
    assert "nope.pt" in str(info.value) and "checkpoint.resume" in str(info.value)
    path = tmp_path / "half.pt"
    torch.save(state_for(1), path)
    truncate_half(path)
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def _draws() -> list[Any]:
    out: list[Any] = [random.random(), random.getrandbits(64), np.random.rand(3).tolist(),
                      np.random.standard_normal(), torch.rand(3).tolist(), torch.randint(0, 10**9, (2,)).tolist()]
    if _DEVICE is not None:
        out.append(torch.rand(3, device=_DEVICE).tolist())
    return out


_DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else None


def test_rng_state_round_trips_through_weights_only_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves numpy's cached second gaussian, which must be restored too
    mgr, _ = manager(tmp_path)
    captured = rng_state(_DEVICE)
    assert captured["numpy"]["has_gauss"] == 1
    mgr.save({"rng": captured}, 1)
    expected = _draws()

    assert _draws() != expected  # the streams moved on
    state, _ = mgr.load_latest()
    set_rng_state(state["rng"], _DEVICE)
    assert _draws() == expected


def test_explicit_path_is_checked_against_its_manifest(tmp_path: Path) -> None:
    mgr, _ = manager(tmp_path)
    path = mgr.save(state_for(1), 1)
    assert load_checkpoint(path)["step"] == 1
    flip_middle(path)
    with pytest.raises(CheckpointError, match="sha256|hash"):
        load_checkpoint(path)


def test_background_saver_writes_a_snapshot_and_reports_failures(tmp_path: Path) -> None:
    from trainers.core.checkpoint import BackgroundSaver

    saver = BackgroundSaver(CheckpointManager(tmp_path / "ckpt"))
    live = torch.zeros(1000)
    path = saver.save({"w": live, "meta": {"step": 1}}, step=1)
    live += 1  # training goes on changing the live tensor while the file is written
    saver.wait()
    loaded, found = CheckpointManager(tmp_path / "ckpt").load_latest()  # type: ignore[misc]
    assert found == path and torch.equal(loaded["w"], torch.zeros(1000)) and loaded["meta"] == {"step": 1}

    saver.save({"w": live}, step=2)
    saver.save({"w": live + 1}, step=3)  # waits for step 2 first: writes land in order
    saver.wait()
    assert [p.name for p in CheckpointManager(tmp_path / "ckpt").list()] == [
        "step-00000001.pt", "step-00000002.pt", "step-00000003.pt"]

    saver.save({"w": live, "oops": lambda: None}, step=4)  # cannot be pickled: the write fails in the thread ...
    with pytest.raises(Exception, match="(?i)pickle"):  # ... and the training thread hears of it
        saver.wait()
    assert CheckpointManager(tmp_path / "ckpt").load_latest()[1].name == "step-00000003.pt"  # type: ignore[index]


def test_migrations_bring_every_earlier_format_to_todays() -> None:
    from trainers.core.checkpoint import FORMAT, migrate

    rank = {"rng": {"torch": torch.zeros(1)}, "window": 1.5, "window_steps": 3}
    format0 = {"model": {}, "train_state": {"epoch": 1, "step_in_epoch": 2, "global_step": 6}, "sampler_seed": 7,
               "global_batch_size": 64, "ranks": [rank]}
    state = migrate(format0)
    assert state["format"] == FORMAT and "sampler_seed" not in state
    assert state["train_state"] == {"epoch": 1, "step_in_epoch": 2, "global_step": 6, "seed": 7, "global_batch_size": 64}
    assert state["ranks"] == [{"rng": rank["rng"], "losses": {"sum": 1.5, "steps": 3}}]
    assert migrate(state) == state, "today's format is left as it is"
    with pytest.raises(CheckpointError, match="newer"):
        migrate({**state, "format": FORMAT + 1})


def _checkpointer(tmp_path: Path, **cfg: Any) -> Any:
    from launcher.env import resolve_env
    from launcher.runtime import Runtime
    from trainers.core.checkpoint import Checkpointer
    from trainers.core.config import CheckpointConfig, Config
    from trainers.core.state import Registry

    rt = Runtime(env=resolve_env({}), device=torch.device("cpu"), backend=None, timeout_s=10)
    return Checkpointer(CheckpointConfig(**cfg), rt, tmp_path, Registry(), Registry(), Config(), log=Log())


def test_model_pt_is_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpointer = _checkpointer(tmp_path)
    model = torch.nn.Linear(3, 2)
    path = checkpointer.export_model(model)
    before = path.read_bytes()

    def torn_save(obj: Any, f: Any) -> None:  # a disk that fills up half-way through the write
        f.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(OSError, match="No space"):
        checkpointer.export_model(model)
    assert path.read_bytes() == before, "the previous model.pt is intact"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"], "no temporary file left behind"


def test_time_based_checkpoints_are_due_by_the_agreed_idle_time(tmp_path: Path) -> None:
    checkpointer = _checkpointer(tmp_path, every_epochs=0, every_minutes=0.5)
    assert not checkpointer.due(7) and not checkpointer.due(7, idle_s=29.9)
    assert checkpointer.due(7, idle_s=30.0) and checkpointer.due(7, epochs_done=1, idle_s=31)
    assert not _checkpointer(tmp_path, every_epochs=0).due(7, idle_s=1e9), "every_minutes=0: never by time"

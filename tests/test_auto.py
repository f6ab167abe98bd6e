"""Device-aware defaults: what `auto` becomes on each kind of device, that explicit values win, that the
run keeps `auto` in its files, and that `model.compile=true` trains the same model as eager mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from launcher.config import ConfigError, load_config
from trainers.core.config import Config, Precision
from tests.dist_utils import run_cli, run_ranks
from tests.tasks import TracingTrainer, debug_config, task_class
from trainers.core.auto import DeviceTraits, auto_choices, describe_choices, resolve_auto
from trainers.core.checkpoint import load_checkpoint
from trainers.core.parallel import unwrap

# A GPU cannot exist on this machine: the traits of one are spelled out (what DeviceTraits.of reads).
A100 = DeviceTraits("cuda", bf16=True, triton=True)
V100 = DeviceTraits("cuda", bf16=False, triton=True)
NO_TRITON = DeviceTraits("cuda", bf16=True, triton=False)
CPU = DeviceTraits("cpu")
CPU_ONEDNN = DeviceTraits("cpu", onednn=True)


@pytest.mark.parametrize("traits,debug,expected", [
    (CPU, False, (Precision.fp32, False, False)),
    (CPU_ONEDNN, False, (Precision.fp32, True, False)),
    (A100, False, (Precision.bf16, True, True)),
    (V100, False, (Precision.fp16, True, True)),
    (NO_TRITON, False, (Precision.bf16, True, False)),
    (A100, True, (Precision.bf16, True, False)),  # run.debug: eager, so tracebacks point into the model
])
def test_auto_choices_per_device(traits: DeviceTraits, debug: bool, expected: tuple) -> None:
    chosen = auto_choices(traits, debug)
    assert (chosen["train.precision"], chosen["model.channels_last"], chosen["model.compile"]) == expected


def test_the_defaults_are_auto_and_resolve_per_device() -> None:
    cfg = debug_config([])
    assert (cfg.train.precision, cfg.model.channels_last, cfg.model.compile) == (Precision.auto, "auto", "auto")
    on_gpu, chosen = resolve_auto(cfg, A100)
    assert (on_gpu.train.precision, on_gpu.model.channels_last, on_gpu.model.compile) == (Precision.bf16, True, True)
    assert set(chosen) == {"train.precision", "model.channels_last", "model.compile"}
    on_cpu, _ = resolve_auto(cfg, CPU)
    assert (on_cpu.train.precision, on_cpu.model.channels_last, on_cpu.model.compile) == (Precision.fp32, False, False)
    assert cfg.model.compile == "auto"  # the user's config is not changed


def test_explicit_values_win_over_auto() -> None:
    cfg = debug_config(["train.precision=fp32", "model.channels_last=false", "model.compile=true"])
    resolved, chosen = resolve_auto(cfg, A100)
    assert (resolved.train.precision, resolved.model.channels_last, resolved.model.compile) == \
        (Precision.fp32, False, True)
    assert chosen == {}
    assert describe_choices(chosen, "cuda").startswith("none")
    partly, chosen = resolve_auto(debug_config(["model.compile=false"]), A100)
    assert partly.model.compile is False and describe_choices(chosen, "cuda") == \
        "train.precision=bf16, model.channels_last=true  (auto on cuda)"


@pytest.mark.parametrize("value,expected", [("true", True), ("false", False), ("auto", "auto")])
def test_switch_keys_accept_true_false_auto(value: str, expected: bool | str) -> None:
    cfg = load_config(None, [f"model.channels_last={value}", f"model.compile={value}"], schema=Config)
    assert cfg.model.channels_last == expected and cfg.model.compile == expected


def test_a_switch_key_rejects_other_words() -> None:
    with pytest.raises(ConfigError, match=r"model.compile.*'sometimes'.*true, false or auto"):
        load_config(None, ["model.compile=sometimes"], schema=Config)


def test_run_files_keep_auto_and_the_table_says_what_it_became(tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = run_cli(["trainers.cifar", "--config", "configs/cifar_debug.yaml", f"run.dir={run}", "run.progress=lines",
                   "train.max_steps=2", "model.compile=false"])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["precision"] == "auto" and saved["model"]["channels_last"] == "auto"
    assert saved["model"]["compile"] is False
    nhwc = str(DeviceTraits.of(torch.device("cpu")).onednn).lower()
    assert f"train.precision=fp32, model.channels_last={nhwc}  (auto on cpu)" in out.stdout
    # the checkpoint records what was actually trained
    checkpoint = sorted((run / "checkpoints").glob("step-*.pt"))[-1]
    assert load_checkpoint(checkpoint)["config"]["train"]["precision"] == "fp32"


def test_compiled_training_matches_eager_and_checkpoints_plain_keys(tmp_path: Path) -> None:
    """torch.compile inside DDP on 2 gloo ranks: the same weights step by step as eager mode (up to the
    generated kernels' rounding), and checkpoints whose keys load into an uncompiled model."""
    steps = ["train.max_steps=4", "model.channels_last=true"]
    eager, eager_wrapped = run_ranks(_trace_and_wrapping, 2, [*steps, "model.compile=false"],
                                     str(tmp_path / "eager"))[0]
    compiled, compiled_wrapped = run_ranks(_trace_and_wrapping, 2, [*steps, "model.compile=true"],
                                           str(tmp_path / "compiled"), timeout=400)[0]
    assert (eager_wrapped, compiled_wrapped) == (False, True)
    assert len(compiled) == len(eager) == 4
    # Generated kernels fuse and reorder float sums, so the weights are close, not equal: compiled training
    # must move the weights where eager training moves them, up to 1% of the distance they travel.
    travelled = (eager[-1] - eager[0]).norm()
    for a, b in zip(eager, compiled):
        assert (b - a).norm() <= 0.01 * travelled, f"compiled drifts {(b - a).norm() / travelled:.1%} from eager"
    assert not torch.equal(compiled[0], compiled[-1])
    state = load_checkpoint(sorted((tmp_path / "compiled" / "checkpoints").glob("step-*.pt"))[-1])["model"]
    assert not [k for k in state if k.startswith(("module.", "_orig_mod."))]


def _trace_and_wrapping(overrides: list[str], run_dir: str) -> tuple[list[torch.Tensor], bool]:
    """Rank function: the per-step parameter trace, and whether DDP holds a torch.compile'd model."""
    from launcher.runtime import distributed

    torch.set_num_threads(1)
    cfg = debug_config([f"run.dir={run_dir}", *overrides])
    with distributed(cfg.dist) as rt:
        trainer = TracingTrainer(task_class("cifar")(cfg), rt, Path(run_dir))
        trainer.fit()
        inner = getattr(trainer.model, "module", trainer.model)  # under DDP
        return trainer.trace, hasattr(inner, "_orig_mod") and unwrap(inner) is not inner

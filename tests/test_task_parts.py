"""Unit tests of the task API's parts: metrics, optimizer and schedules, per-sample seeding, batches,
the state registry, init_from and freeze."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from launcher.config import ConfigError
from trainers.core.config import OptimConfig, SchedConfig
from trainers.core.checkpoint import CheckpointError
from trainers.core.data import HostLoader, ResumableDistributedSampler, chunk, sample_seed
from trainers.core.metrics import Accuracy, ConfusionMatrix, MeanIoU, MeanLoss
from trainers.core.optim import ConfiguredHyperparameters, build_optimizer, build_scheduler, param_groups
from trainers.core.pretrained import freeze, init_from
from trainers.core.state import Registry, TrainState

CPU = torch.device("cpu")


def _run(metric, outputs, targets, splits=1):
    sums = torch.zeros(metric.size, dtype=torch.float64)
    for out, tgt in zip(outputs.tensor_split(splits), targets.tensor_split(splits)):
        metric.update(sums, out, tgt)
    return metric.compute(sums)


# --------------------------------------------------------------------------- metrics


def test_accuracy_top1_and_top2():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    targets = torch.tensor([0, 2, 0, 1])
    assert _run(Accuracy(), logits, targets) == 0.25
    assert _run(Accuracy(topk=2), logits, targets) == 0.5  # sample 1's target is its 2nd score


def test_metric_sums_do_not_depend_on_how_the_set_is_split():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(101, 5, generator=g), torch.randint(0, 5, (101,), generator=g)
    for metric in (Accuracy(), MeanLoss(), MeanIoU(5)):
        assert _run(metric, logits, targets, 1) == pytest.approx(_run(metric, logits, targets, 7), rel=1e-12)
    assert _run(MeanLoss(), logits, targets) == pytest.approx(nn.functional.cross_entropy(logits, targets).item())


def test_confusion_matrix_and_mean_iou():
    outputs = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 2]), 3).float()  # predictions 0,0,1,1,2
    targets = torch.tensor([0, 1, 1, 1, 2])
    assert _run(ConfusionMatrix(3), outputs, targets) == [[1, 0, 0], [1, 2, 0], [0, 0, 1]]
    # IoU: class 0: 1/(2+1-1)=0.5, class 1: 2/(2+3-2)=2/3, class 2: 1
    assert _run(MeanIoU(3), outputs, targets) == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    assert _run(ConfusionMatrix(3, ignore_index=1), outputs, targets) == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]


def test_dense_mean_iou_on_segmentation_shapes():
    targets = torch.tensor([[[0, 1], [1, 1]]])  # (N, H, W)
    outputs = torch.nn.functional.one_hot(targets, 2).permute(0, 3, 1, 2).float()  # perfect (N, C, H, W)
    assert _run(MeanIoU(2), outputs, targets) == 1.0


# --------------------------------------------------------------------------- optimizer and schedules


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 2))


def test_no_weight_decay_on_norm_layers_and_biases():
    model = _net()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["0.weight", "4.weight"]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 6


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam)])
def test_optimizer_from_config(name, cls):
    opt = build_optimizer(OptimConfig(name=name, lr=0.01, betas=(0.8, 0.9)), _net())
    assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.01
    if name != "sgd":
        assert opt.param_groups[0]["betas"] == (0.8, 0.9)


def test_frozen_parameters_are_left_out_of_the_optimizer():
    model = _net()
    freeze(model, "0")
    params = [p for g in build_optimizer(OptimConfig(), model).param_groups for p in g["params"]]
    assert all(p.requires_grad for p in params) and len(params) == 6


def _lrs(sched: SchedConfig, steps_per_epoch: int = 10, total: int = 100, optim: str = "sgd") -> list[float]:
    opt = build_optimizer(OptimConfig(name=optim, lr=1.0), nn.Linear(2, 2))
    scheduler = build_scheduler(sched, opt, steps_per_epoch, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


def test_cosine_warms_up_then_decays_to_final_lr():
    lrs = _lrs(SchedConfig(name="cosine", warmup_epochs=1, final_lr=0.1))
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))


def test_step_schedule_decays_every_step_epochs():
    lrs = _lrs(SchedConfig(name="step", warmup_epochs=0, step_epochs=3, gamma=0.5))
    assert lrs[29] == 1.0 and lrs[30] == 0.5 and lrs[60] == 0.25 and lrs[99] == 0.125


def test_constant_and_onecycle():
    assert set(_lrs(SchedConfig(name="constant", warmup_epochs=0))) == {1.0}
    lrs = _lrs(SchedConfig(name="onecycle", warmup_epochs=3), optim="adamw")
    peak = max(range(100), key=lambda i: lrs[i])
    assert 28 <= peak <= 30 and lrs[peak] == pytest.approx(1.0, rel=1e-3) and lrs[-1] < 1e-3
    with pytest.raises(ConfigError, match="sched.warmup_epochs"):
        _lrs(SchedConfig(name="onecycle", warmup_epochs=0))


@pytest.mark.parametrize("sched, optim", [("cosine", "sgd"), ("onecycle", "sgd"), ("onecycle", "adamw"),
                                          ("torch StepLR", "sgd")])
def test_changed_optimizer_settings_replace_a_checkpoints_and_same_ones_change_nothing(sched: str, optim: str):
    """A checkpoint written at step 40 with lr 1 and weight decay 0.1, loaded by a run configured with lr 0.5 and
    weight decay 0.2: from there on, learning rate, weight decay and a cycled momentum are those of a run configured
    so from the start. Loaded by a run with the checkpoint's own settings, nothing is touched."""
    def build(lr: float, decay: float):
        opt = build_optimizer(OptimConfig(name=optim, lr=lr, weight_decay=decay), nn.Linear(2, 2))
        if sched == "torch StepLR":  # a task's own schedule, computed from the previous step's lr (chainable)
            return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.1)
        return opt, build_scheduler(SchedConfig(name=sched, warmup_epochs=3), opt, 10, 100)

    def advance(opt, scheduler, steps: int) -> None:
        for _ in range(steps):
            opt.step()
            scheduler.step()

    def settings(opt) -> list[float]:  # each group's lr, weight decay and momentum (or beta1), flat
        return [v for g in opt.param_groups
                for v in (g["lr"], g["weight_decay"], g.get("betas", [g.get("momentum")])[0])]

    old, old_sched = build(1.0, 0.1)
    advance(old, old_sched, 40)
    saved = (old.state_dict(), old_sched.state_dict())
    for lr, decay in ((0.5, 0.2), (1.0, 0.1)):
        new, new_sched = build(lr, decay)
        configured = ConfiguredHyperparameters(new, new_sched)
        new.load_state_dict(saved[0])
        new_sched.load_state_dict(saved[1])
        loaded = settings(new)
        changed = configured.reapply()
        straight, straight_sched = build(lr, decay)
        advance(straight, straight_sched, 40)
        if lr == 1.0:
            assert changed == [] and settings(new) == loaded, "the checkpoint's own settings: nothing recomputed"
        else:
            assert {"lr", "weight_decay"} <= set(changed), changed
        assert settings(new) == pytest.approx(settings(straight))
        advance(new, new_sched, 10)
        advance(straight, straight_sched, 10)
        assert settings(new) == pytest.approx(settings(straight)), "and the schedule goes on from them"


# --------------------------------------------------------------------------- per-sample seeding


class Noisy(Dataset):
    """Every draw from the global RNGs, as random transforms do (torch, python and numpy)."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.rand(3) + random.random() + float(np.random.rand()), "i": torch.tensor(i)}


def _epoch(workers: int, seed: int = 3, epoch: int = 1, start: int = 0) -> list[dict[str, torch.Tensor]]:
    sampler = ResumableDistributedSampler(Noisy(), 1, 0, seed, 8)
    sampler.set_epoch(epoch, start)
    loader = HostLoader(Noisy(), sampler, 8, True, CPU, num_workers=workers, persistent_workers=False)
    return [batch for batch, _ in loader.epoch(seed, epoch)]


def test_random_samples_are_the_same_with_any_worker_count_and_after_resume():
    main, workers = _epoch(0), _epoch(2)
    assert all(torch.equal(a["x"], b["x"]) and torch.equal(a["i"], b["i"]) for a, b in zip(main, workers))
    resumed = _epoch(2, start=2)  # a resumed epoch starts at its third batch
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(main[2:], resumed))
    assert not torch.equal(_epoch(0, epoch=2)[0]["x"], main[0]["x"]), "another epoch draws anew"


def test_loading_in_the_main_process_leaves_the_global_rngs_alone():
    torch.manual_seed(7)
    random.seed(7)
    expected = torch.rand(1), random.random()
    torch.manual_seed(7)
    random.seed(7)
    _epoch(0)
    assert (torch.rand(1), random.random()) == expected


def test_sample_seed_is_a_pure_well_spread_function():
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(100)}
    assert len(seeds) == 900 and all(0 <= x < 2**63 for x in seeds)
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3)


# --------------------------------------------------------------------------- batches, state, init_from


def test_chunk_splits_dict_and_tuple_batches_along_samples():
    batch = {"x": torch.arange(8).view(4, 2), "name": ["a", "b", "c", "d"], "meta": (torch.arange(4), 5)}
    parts = chunk(batch, 2)
    assert parts[1]["x"].tolist() == [[4, 5], [6, 7]] and parts[1]["name"] == ["c", "d"]
    assert parts[0]["meta"][0].tolist() == [0, 1] and parts[0]["meta"][1] == 5


def test_registry_restores_every_object_and_names_missing_ones():
    a, b = TrainState(epoch=3), TrainState()
    reg = Registry()
    reg.register("progress", a)
    saved = reg.state_dict()
    other = Registry()
    other.register("progress", b)
    other.load_state_dict(saved)
    assert b.epoch == 3
    other.register("task.extra", TrainState())
    with pytest.raises(CheckpointError, match="task.extra"):
        other.load_state_dict(saved)
    with pytest.raises(TypeError):
        other.register("bad", object())  # type: ignore[arg-type]


def test_init_from_reports_and_freeze_names_unknown_prefixes(tmp_path):
    src = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 10))
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "ckpt.pt")
    dst = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    report = init_from(dst, tmp_path / "ckpt.pt")
    assert sorted(report.loaded) == ["0.bias", "0.weight"]
    assert report.mismatched == ["1.weight (10, 8)->(3, 8)", "1.bias (10,)->(3,)"]
    assert torch.equal(dst[0].weight, src[0].weight)
    with pytest.raises(ConfigError, match="no parameter name starts with 'encoder'"):
        freeze(dst, "encoder")

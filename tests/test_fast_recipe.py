"""The pieces of the fast recipe (configs/cifar_fast.yaml): airbench network and whitening, alternating flip,
reflect-padded crops, the triangle schedule, Lookahead and test-time augmentation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launcher.config import ConfigError, load_config
from trainers.core.config import SchedConfig
from trainers.cifar import CifarConfig, CifarTask
from trainers.core.averaging import Lookahead
from trainers.core.data import Augment
from trainers.core.optim import lr_factor
from trainers.models import airbench_net, init_whitening

REPO = Path(__file__).resolve().parents[1]


def test_fast_config_loads_with_its_published_settings() -> None:
    cfg = load_config(REPO / "configs" / "cifar_fast.yaml", schema=CifarConfig)
    assert (cfg.model.name, cfg.train.batch_size, cfg.optim.momentum, cfg.train.label_smoothing) == (
        "airbench", 1024, 0.85, 0.2)
    assert cfg.model.whiten_bias_epochs == 3
    assert (cfg.train.flip, cfg.train.lookahead, cfg.eval.tta, cfg.sched.name) == (
        "alternate", True, "mirror_translate", "triangle")


def test_whitening_makes_patches_uncorrelated_with_unit_variance() -> None:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(3, 3, generator=g)
    images = torch.einsum("ij,njhw->nihw", mix, torch.randn(64, 3, 16, 16, generator=g))  # correlated channels
    net = airbench_net()
    init_whitening(net[0], images)
    out = torch.nn.functional.conv2d(images, net[0].weight[:12]).permute(0, 2, 3, 1).reshape(-1, 12)
    cov = out.T.cov()
    torch.testing.assert_close(cov, torch.eye(12), atol=0.05, rtol=0)
    torch.testing.assert_close(net[0].weight[12:], -net[0].weight[:12])
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_alternating_flip_reverses_every_other_epoch() -> None:
    aug = Augment(100, pad=0, alternate_flip=True)
    images = torch.arange(100 * 4, dtype=torch.float32).reshape(100, 1, 1, 4)
    index = torch.arange(100)
    e0, e1, e2 = (aug(images, index, e, 7) for e in (0, 1, 2))
    assert torch.equal(e0, e2) and torch.equal(e1.flip(3), e0)
    flipped = sum(not torch.equal(e0[i], images[i]) for i in range(100))
    assert 20 < flipped < 80  # a random half of the images starts flipped


def test_reflect_padding_crops_contain_no_zeros() -> None:
    aug = Augment(50, pad=2, flip=False, reflect=True)
    images = torch.rand(50, 3, 8, 8) + 1
    out = aug(images, torch.arange(50), 0, 0)
    assert out.shape == images.shape and bool((out > 0).all())
    assert not torch.equal(out, images)  # shifted


def test_triangle_schedule() -> None:
    cfg = SchedConfig(name="triangle", initial_lr=0.2, warmup_epochs=2.3, final_lr=0.07)
    f = lr_factor(cfg, steps_per_epoch=10, total_steps=100)
    assert abs(f(0) - 0.2) < 1e-9 and abs(f(23) - 1.0) < 1e-9 and abs(f(100) - 0.07) < 1e-9
    assert f(10) < f(20) and f(50) > f(80)


def test_lookahead_pulls_weights_to_their_average_and_ends_on_it() -> None:
    model = torch.nn.Linear(2, 2)
    la = Lookahead()
    la.step(model, 1, 10)  # first call: remembers the weights
    with torch.no_grad():
        model.weight.add_(1.0)
    before = model.weight.clone()
    la.step(model, 5, 10)  # decay 0.95^5 * 0.125: mostly the new weights
    assert not torch.equal(model.weight, before) and torch.equal(model.weight, la.average["weight"])
    restored = Lookahead()
    restored.load_state_dict(la.state_dict())
    with torch.no_grad():
        model.weight.add_(1.0)
    la.step(model, 10, 10)  # the last step: the weights become the average, which stays
    assert torch.equal(model.weight, la.average["weight"]) and torch.equal(la.average["weight"], restored.average["weight"])


def test_mirror_tta_averages_the_flipped_view(tmp_path: Path) -> None:
    cfg = load_config(None, ["eval.tta=mirror", "model.name=tiny", f"run.dir={tmp_path}"], schema=CifarConfig)
    task = CifarTask(cfg)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3)).eval()
    x = torch.randn(5, 3, 4, 4)
    torch.testing.assert_close(task.forward(model, (x, None)), 0.5 * (model(x) + model(x.flip(-1))))
    model.train()
    torch.testing.assert_close(task.forward(model, (x, None)), model(x))  # training sees the plain view


def _whiten_task(overrides: list[str]) -> CifarTask:
    return CifarTask(load_config(None, ["model.name=airbench", "sched.name=triangle", "sched.initial_lr=0.2", "optim.lr=0.05",
                                        *overrides], schema=CifarConfig))


def test_whitening_bias_learns_for_its_epochs_then_stays_fixed() -> None:
    """model.whiten_bias_epochs=1 with 2 steps per epoch: the bias moves in steps 1-2, never after, while
    the rest of the network keeps learning (momentum and weight decay included)."""
    task = _whiten_task(["model.whiten_bias_epochs=1", "optim.no_decay_lr_scale=64"])
    torch.manual_seed(0)
    model = task.build_model()
    optimizer = task.build_optimizer(model)
    scheduler = task.build_scheduler(optimizer, steps_per_epoch=2, total_steps=6)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    biases, heads = [model[0].bias.detach().clone()], [model[-2].weight.detach().clone()]
    for _ in range(6):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()
        biases.append(model[0].bias.detach().clone())
        heads.append(model[-2].weight.detach().clone())
    assert not torch.equal(biases[0], biases[1]) and not torch.equal(biases[1], biases[2])
    assert all(torch.equal(biases[2], b) for b in biases[3:])
    assert all(not torch.equal(a, b) for a, b in zip(heads[2:], heads[3:]))
    # as in airbench94, the whitening bias is trained like the weights: decayed, without the bias lr scale
    weights, biases_group, whiten = optimizer.param_groups
    assert whiten["params"] == [model[0].bias] and all(p is not model[0].bias for p in biases_group["params"])
    assert (whiten["initial_lr"], whiten["weight_decay"]) == (weights["initial_lr"], weights["weight_decay"]) == (
        0.05, 5e-4)
    assert biases_group["initial_lr"] == 0.05 * 64


def test_whitening_bias_epochs_is_checked() -> None:
    with pytest.raises(ConfigError, match="applies to model.name=airbench only"):
        load_config(None, ["model.whiten_bias_epochs=3"], schema=CifarConfig)
    with pytest.raises(ConfigError, match="sched.name=onecycle"):
        load_config(None, ["model.name=airbench", "model.whiten_bias_epochs=3", "sched.name=onecycle"],
                    schema=CifarConfig)

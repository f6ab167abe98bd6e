"""Precision policy: autocast dtypes, GradScaler only for fp16, clipping on unscaled gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from trainers.core.config import Precision
from tests.dist_utils import run_ranks
from tests.tasks import train_trace
from trainers.core.amp import Amp

CPU = torch.device("cpu")


@pytest.mark.parametrize("precision,dtype", [(Precision.fp32, torch.float32), (Precision.bf16, torch.bfloat16),
                                             (Precision.fp16, torch.float16)])
def test_autocast_dtype_and_scaler(precision: Precision, dtype: torch.dtype) -> None:
    amp = Amp(precision, CPU)
    with amp.autocast():
        out = nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == dtype
    assert (amp.scaler is not None) == (precision is Precision.fp16)


def _one_clipped_step(precision: Precision, max_norm: float) -> float:
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    before = torch.cat([p.detach().clone().reshape(-1) for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    amp = Amp(precision, CPU)
    if amp.scaler is not None:  # a scale whose scaled gradients fit fp16, so the step is not skipped
        amp.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with amp.autocast():
        loss = model(torch.randn(16, 8)).float().pow(2).mean()  # gradient norm far above max_norm
    amp.backward(loss)
    amp.step(opt, model.parameters(), max_norm)
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return (after - before).norm().item()


@pytest.mark.parametrize("precision", [Precision.fp32, Precision.fp16])
def test_clipping_sees_true_gradient_norm(precision: Precision) -> None:
    # With lr=1 and plain SGD the update is the clipped gradient: its norm must be max_norm. Clipping the
    # still-scaled fp16 gradients would shrink the update by the loss scale.
    assert _one_clipped_step(precision, 0.001) == pytest.approx(0.001, rel=1e-2)


def test_fp16_scaler_state_round_trips() -> None:
    amp = Amp(Precision.fp16, CPU)
    state = amp.state_dict()
    assert state["scale"] == 65536.0
    state["scale"] = 1024.0
    other = Amp(Precision.fp16, CPU)
    other.load_state_dict(state)
    assert other.scaler.get_scale() == 1024.0  # type: ignore[union-attr]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_cpu_learns(tmp_path, precision: str) -> None:
    # A small model and batch: convolutions in fp16 run slowly on a CPU (what is checked is that it trains)
    trace = run_ranks(train_trace, 1, "cifar", [f"train.precision={precision}", "train.max_steps=12", "model.width=4",
                                                "train.batch_size=32"], str(tmp_path / precision))[0]
    assert len(trace) == 12 and all(torch.isfinite(t).all() for t in trace)
    assert not torch.equal(trace[0], trace[-1])

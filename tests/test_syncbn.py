"""SyncBN on CPU ranks equals plain BatchNorm over the concatenated global batch (forward and backward)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from tests.dist_utils import fork_ranks, run_ranks, wait_all
from tests.tasks import DEBUG_CONFIG
from trainers.core.parallel import GlooSyncBatchNorm, convert_sync_batchnorm
from trainers.models import tiny_cnn

B, C, SEED = 6, 5, 7


def _inputs(world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(world * B, C, 4, 3, generator=g) * 3 + 1
    upstream = torch.randn(world * B, C, 4, 3, generator=g)
    weight, bias = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    return x, upstream, weight, bias


def _bn(module: nn.BatchNorm2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.BatchNorm2d:
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    return module


def _rank(steps: int) -> dict[str, torch.Tensor]:
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        x, upstream, weight, bias = _inputs(world)
        bn = _bn(GlooSyncBatchNorm(C), weight, bias)
        part = slice(rank * B, (rank + 1) * B)
        xs = x[part].clone().requires_grad_()
        for _ in range(steps):  # several forwards exercise the running statistics
            y = bn(xs)
        (y * upstream[part]).sum().backward()
        grads = torch.cat([bn.weight.grad, bn.bias.grad])
        dist.all_reduce(grads)  # parameter gradients are per-rank partial sums (DDP would all-reduce them)
        return {"y": y.detach(), "dx": xs.grad, "dparams": grads, "running_mean": bn.running_mean,
                "running_var": bn.running_var}
    finally:
        dist.destroy_process_group()


def _reference(world: int, steps: int) -> dict[str, torch.Tensor]:
    x, upstream, weight, bias = _inputs(world)
    bn = _bn(nn.BatchNorm2d(C), weight, bias)
    xs = x.clone().requires_grad_()
    for _ in range(steps):
        y = bn(xs)
    (y * upstream).sum().backward()
    return {"y": y.detach(), "dx": xs.grad, "dparams": torch.cat([bn.weight.grad, bn.bias.grad]),
            "running_mean": bn.running_mean, "running_var": bn.running_var}


def test_two_rank_syncbn_equals_batchnorm_on_double_batch() -> None:
    steps = 3
    ranks = run_ranks(_rank, 2, steps, timeout=120)
    ref = _reference(2, steps)
    for rank, out in enumerate(ranks):
        part = slice(rank * B, (rank + 1) * B)
        torch.testing.assert_close(out["y"], ref["y"][part], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["dx"], ref["dx"][part], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out["dparams"], ref["dparams"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["running_mean"], ref["running_mean"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["running_var"], ref["running_var"], rtol=1e-5, atol=1e-6)


def test_syncbn_differs_from_per_rank_batchnorm() -> None:
    """Guard against a vacuous pass: per-rank statistics would give a different output."""
    x, _, weight, bias = _inputs(2)
    local = _bn(nn.BatchNorm2d(C), weight, bias)(x[:B])
    global_ = _bn(nn.BatchNorm2d(C), weight, bias)(x)[:B]
    assert not torch.allclose(local, global_, atol=1e-3)


def test_conversion_keeps_parameters_and_buffers() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[2][0].weight.fill_(2.0)
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    assert isinstance(converted[1], GlooSyncBatchNorm) and isinstance(converted[2][0], GlooSyncBatchNorm)
    assert torch.equal(converted[1].running_mean, torch.full((4,), 0.5))
    assert torch.equal(converted[2][0].weight, torch.full((4,), 2.0))


def test_single_process_falls_back_to_batchnorm() -> None:
    x, _, weight, bias = _inputs(1)
    torch.testing.assert_close(_bn(GlooSyncBatchNorm(C), weight, bias)(x), _bn(nn.BatchNorm2d(C), weight, bias)(x))


def _rank_bf16() -> torch.Tensor:
    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        x, _, weight, bias = _inputs(world)
        bn = _bn(GlooSyncBatchNorm(C), weight, bias)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = bn(x[rank * B:(rank + 1) * B].bfloat16())  # what a conv under autocast hands it
        assert y.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
        return y.float()
    finally:
        dist.destroy_process_group()


def test_syncbn_under_bf16_autocast_matches_fp32_batchnorm() -> None:
    ranks = run_ranks(_rank_bf16, 2, timeout=120)
    ref = _reference(2, 1)["y"]
    torch.testing.assert_close(torch.cat(ranks), ref, rtol=0.05, atol=0.05)


def test_conversion_keeps_the_parameter_objects_and_what_is_frozen() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    weight, bias = model[1].weight, model[1].bias
    weight.requires_grad_(False)
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    assert converted[1].weight is weight and converted[1].bias is bias, "an optimizer built before keeps working"
    assert not converted[1].weight.requires_grad and converted[1].bias.requires_grad


def test_frozen_layers_stay_frozen_under_cpu_syncbn_on_two_ranks(tmp_path) -> None:
    """model.freeze with model.sync_bn=true on 2 gloo ranks: the frozen tensors end bit-equal to the weights they
    started from (init_from), and the optimizer never holds them."""
    start = tmp_path / "start.pt"
    torch.manual_seed(0)

    model = tiny_cnn(10, 8)
    torch.save(model.state_dict(), start)
    frozen = ["5.weight", "5.bias", "9.weight", "9.bias"]  # the BatchNorms of the 2nd and 3rd blocks
    run_dir = tmp_path / "run"
    args = ["trainers.cifar", "--config", str(DEBUG_CONFIG), "model.width=8", "train.epochs=1", "model.sync_bn=true",
            f"model.init_from={start}", "model.freeze=5,9", f"run.dir={run_dir}", "run.progress=quiet"]
    assert wait_all(fork_ranks(args, 2, tmp_path), 240, tmp_path) == [0, 0], (tmp_path / "rank0.log").read_text()
    before = torch.load(start, weights_only=True)
    after = torch.load(run_dir / "model.pt", weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in frozen), "frozen tensors moved"
    assert not torch.equal(before["4.weight"], after["4.weight"]), "the rest trains"
    state = torch.load(sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1], weights_only=True)
    in_optimizer = sum(len(group["params"]) for group in state["optimizer"]["param_groups"])
    assert in_optimizer == len(list(model.parameters())) - len(frozen), "frozen tensors are not in the optimizer"

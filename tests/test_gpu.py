"""GPU checks: ``pytest -m gpu`` on a machine with CUDA (skipped, saying so, without one).

nccl at world size 1, CUDA autocast (bf16; fp16 with GradScaler), torch's SyncBatchNorm, channels_last,
torch.compile, the device-resident loader on CUDA, no host synchronisation between log steps, and a
whole training run on the GPU.

Two ranks on one GPU for SyncBatchNorm are not tested: NCCL refuses two ranks on the same device
("Duplicate GPU detected"), and torch's SyncBatchNorm needs a CUDA-capable backend; it runs at world
size 1 here (torch's own multi-GPU path needs one GPU per rank).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from trainers.core.config import Precision
from tests.dist_utils import REPO, free_port, run_command

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEBUG_CONFIG = REPO / "configs" / "cifar_debug.yaml"


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10))


@pytest.fixture
def nccl_world_1() -> object:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    yield dist
    dist.destroy_process_group()


def test_nccl_all_reduce_at_world_size_1(nccl_world_1: object) -> None:
    import torch.distributed as dist

    t = torch.arange(4.0, device="cuda")
    dist.all_reduce(t)
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("precision", [Precision.bf16, Precision.fp16])
def test_cuda_autocast_training_step(precision: Precision) -> None:
    from trainers.core.amp import Amp

    device = torch.device("cuda")
    model = _net().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp = Amp(precision, device)
    x, y = torch.randn(32, 3, 16, 16, device=device), torch.randint(0, 10, (32,), device=device)
    before = [p.detach().clone() for p in model.parameters()]
    with amp.autocast():
        out = model(x)
        assert out.dtype == (torch.bfloat16 if precision is Precision.bf16 else torch.float16)
        loss = nn.functional.cross_entropy(out, y)
    amp.backward(loss)
    amp.step(opt, model.parameters(), max_norm=1.0)
    assert (amp.scaler is not None) == (precision is Precision.fp16)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "the step changed nothing"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_torch_sync_batchnorm_matches_batchnorm(nccl_world_1: object) -> None:
    from trainers.core.parallel import convert_sync_batchnorm

    torch.manual_seed(0)
    plain = _net().cuda()
    synced = convert_sync_batchnorm(_net().cuda(), torch.device("cuda"))
    synced.load_state_dict(plain.state_dict())
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    x = torch.randn(16, 3, 8, 8, device="cuda")
    torch.testing.assert_close(synced(x), plain(x))


def test_channels_last_and_compile_give_the_same_outputs() -> None:
    torch.manual_seed(0)
    model = _net().cuda().eval()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    expected = model(x)
    nhwc = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc(x.contiguous(memory_format=torch.channels_last)), expected, rtol=1e-3, atol=1e-3)
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-3, atol=1e-3)


def test_device_loader_on_cuda_gives_the_dataloaders_batches() -> None:
    from trainers.cifar_data import synthetic_cifar10
    from trainers.core.data import ResumableDistributedSampler, make_loader

    split = synthetic_cifar10(1000, seed=0)
    batches = {}
    for kind in ("device", "dataloader"):
        sampler = ResumableDistributedSampler(split, 1, 0, seed=0, rank_batch_size=100)
        sampler.set_epoch(0)
        loader = make_loader(kind, split, sampler, 100, True, torch.device("cuda"), 0)
        batches[kind] = [(x.clone(), i.clone()) for (x, _), i in loader.epoch(0, 0)]
        assert batches[kind][0][0].is_cuda
    for (a, ia), (b, ib) in zip(batches["device"], batches["dataloader"]):
        assert torch.equal(a, b.to(a.device)) and torch.equal(ia.cpu(), ib.cpu())


def test_no_host_synchronisation_between_log_steps(tmp_path: Path) -> None:
    """Between two log lines a training step must not wait for the GPU (no .item(), no host copies)."""
    from launcher.config import load_config
    from launcher.env import resolve_env
    from launcher.runtime import distributed
    from trainers.cifar import CifarConfig, CifarTask
    from trainers.core.trainer import Trainer

    cfg = load_config(DEBUG_CONFIG, [f"run.dir={tmp_path}", "run.progress=quiet", "data.loader=device",
                                     "run.log_every=1000000", "checkpoint.every_epochs=0"], schema=CifarConfig)
    with distributed(cfg.dist, resolve_env({})) as rt:
        trainer = Trainer(CifarTask(cfg), rt, tmp_path)
        trainer.train_epoch(0)  # warm-up (first-step allocations and the stop check's first agreement)
        trainer.state.epoch, trainer.state.step_in_epoch = 1, 0
        torch.cuda.set_sync_debug_mode("error")
        try:
            trainer.train_epoch(1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            trainer.sink.close()


@pytest.mark.timeout(660)  # the subprocess bound (600 s) fails first, with the run's output
@pytest.mark.parametrize("launch", ["single", "torchrun"])
def test_training_run_on_the_gpu(tmp_path: Path, launch: str) -> None:
    prefix = [sys.executable, "-m"] if launch == "single" else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m"]
    result = run_command([*prefix, "trainers.cifar", "--config", str(DEBUG_CONFIG), f"run.dir={tmp_path}",
                          "train.precision=bf16", "model.channels_last=true", "model.sync_bn=true",
                          "data.loader=device", "run.progress=lines"], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "cuda" in result.stdout and (tmp_path / "model.pt").is_file()
    if launch == "torchrun":
        assert "nccl" in result.stdout


@pytest.mark.timeout(660)  # torch.compile's first compile can take minutes; the subprocess bound fails first
def test_auto_defaults_turn_on_for_this_gpu(tmp_path: Path) -> None:
    """`auto` on this GPU: bf16 (or fp16 before Ampere), channels_last, compile where Triton is; and a run
    with every default trains and says so in its start-up table."""
    from trainers.core.auto import DeviceTraits, auto_choices

    traits = DeviceTraits.of(torch.device("cuda"))
    chosen = auto_choices(traits, debug=False)
    assert chosen["train.precision"] is (Precision.bf16 if torch.cuda.is_bf16_supported() else Precision.fp16)
    assert chosen["model.channels_last"] is True and chosen["model.compile"] is traits.triton
    out = run_command([sys.executable, "-m", "trainers.cifar", "--config", "configs/cifar_debug.yaml",
                       f"run.dir={tmp_path / 'run'}", "run.progress=lines", "run.debug=false", "train.max_steps=6"],
                      timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"train.precision={chosen['train.precision'].value}, model.channels_last=true" in out.stdout

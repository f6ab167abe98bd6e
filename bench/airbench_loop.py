"""The fast recipe through the toolkit vs airbench94's own training loop, on the same device and data.

The reference loop is our re-implementation of the loop the airbench94 paper describes (Jordan 2024),
kept deliberately plain: the whole split normalised on the device once, reflect-padded once, one
random translation per image per epoch for the whole split at once, alternating flips, batches by randperm, a
summed label-smoothed loss, Nesterov SGD with airbench's "per 1024 examples" hyper-parameters, the
triangular schedule, Lookahead every 5 steps, the whitening bias fixed after 3 epochs, and a final
mirror+translate evaluation. As airbench94 does, it runs a half-precision network (BatchNorm in fp32)
on CUDA; on the CPU, where half convolutions are emulated, both sides run fp32. Both build the same
network (``trainers.models.airbench_net``), so the ratio measures the loops, not the models.

The toolkit side is ``configs/cifar_fast.yaml`` through ``Trainer.fit()`` as a user runs it: its
device-aware defaults, metrics and logging on, exact evaluation with test-time augmentation after the
last epoch, and the final checkpoint. Each side is timed from a built model to a finished evaluation.

    python bench/airbench_loop.py [--train 2048] [--batch 512] [--epochs 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from launcher.config import load_config
from launcher.env import resolve_env
from launcher.runtime import distributed
from trainers.core.rng import seed_everything
from trainers.cifar import SYNTHETIC_SEED, CifarConfig, CifarTask, tta_logits
from trainers.core.averaging import Lookahead
from trainers.cifar_data import CIFAR10_MEAN, CIFAR10_STD, synthetic_cifar10
from trainers.core.data import Normalize, shifted_crops
from trainers.core.optim import triangle
from trainers.core.trainer import Trainer
from trainers.models import AIRBENCH_WIDTHS, airbench_net, init_whitening, whitening_layer

REPO = Path(__file__).resolve().parents[1]

# airbench94's published hyper-parameters (summed loss, "per 1024 examples")
LR, MOMENTUM, WEIGHT_DECAY, BIAS_SCALER, SMOOTHING, WHITEN_BIAS_EPOCHS = 11.5, 0.85, 0.0153, 64.0, 0.2, 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def toolkit_seconds(train: int, test: int, batch: int, epochs: int, overrides: tuple[str, ...] = ()) -> float:
    """Seconds of ``Trainer.fit()`` for the fast recipe on synthetic CIFAR-shaped data."""
    return toolkit_run(train, test, batch, epochs, overrides)[0]


def toolkit_run(train: int, test: int, batch: int, epochs: int, overrides: tuple[str, ...] = (),
                config: str = "cifar_fast.yaml") -> tuple[float, float]:
    """``Trainer.fit()`` of a fast recipe (``configs/<config>``) on synthetic CIFAR-shaped data (``overrides`` may
    point it at real data): (seconds, test accuracy)."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(REPO / "configs" / config, [
            f"run.dir={run_dir}", "run.progress=quiet", "checkpoint.resume=never", "checkpoint.every_epochs=0",
            "data.synthetic=true", f"data.synthetic_train_size={train}", f"data.synthetic_test_size={test}",
            f"train.batch_size={batch}", f"optim.lr={1.5 * batch / 1024}", f"train.epochs={epochs}",
            f"eval.every_epochs={epochs}", f"eval.batch_size={min(test, 2000)}", *overrides], schema=CifarConfig)
        with distributed(cfg.dist, resolve_env({})) as rt:
            trainer = Trainer(CifarTask(cfg), rt, Path(run_dir))
            _sync(rt.device)
            start = time.perf_counter()
            result = trainer.fit()
            _sync(rt.device)
            seconds = time.perf_counter() - start
            trainer.sink.close()
            return seconds, float(result["test_acc"])


def _half_net(net: nn.Module) -> nn.Module:
    net = net.half()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.float()  # as airbench94: BatchNorm in fp32
    return net


def reference_run(train: int, test: int, batch: int, epochs: int, device: torch.device,
                  half: bool | None = None, widths: tuple[int, int, int] = AIRBENCH_WIDTHS) -> tuple[float, float]:
    """The plain airbench94 loop: (seconds, test accuracy with mirror+translate TTA). ``half``: half-precision weights
    with BatchNorm in fp32, as airbench94 runs on CUDA (default: on CUDA only); ``widths``: the conv groups'."""
    train_split = synthetic_cifar10(train, SYNTHETIC_SEED, train=True)  # the toolkit's synthetic splits
    test_split = synthetic_cifar10(test, SYNTHETIC_SEED, train=False)
    images, labels = (t.to(device) for t in train_split.tensors)
    test_images, test_labels = (t.to(device) for t in test_split.tensors)
    half = device.type == "cuda" if half is None else half
    dtype = torch.half if half else torch.float32
    to_float = Normalize(CIFAR10_MEAN, CIFAR10_STD, device)

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return to_float(x).to(dtype).contiguous(memory_format=torch.channels_last)

    seed_everything(0)
    model: nn.Module = airbench_net(widths=widths).to(device)
    _sync(device)
    start = time.perf_counter()
    norm_train = normalize(images)
    init_whitening(whitening_layer(model), norm_train[:5000].float())
    if half:
        model = _half_net(model)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload, unused-ignore]
    kilostep = 1024 * (1 + 1 / (1 - MOMENTUM))
    lr, wd = LR / kilostep, WEIGHT_DECAY * batch / kilostep
    lr_b = lr * BIAS_SCALER
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    norm_biases = [p for k, p in named if isinstance(_owner(model, k), nn.BatchNorm2d)]
    others = [p for k, p in named if not isinstance(_owner(model, k), nn.BatchNorm2d)]
    optimizer = torch.optim.SGD([{"params": norm_biases, "lr": lr_b, "weight_decay": wd / lr_b},
                                 {"params": others, "lr": lr, "weight_decay": wd / lr}],
                                momentum=MOMENTUM, nesterov=True)
    steps_per_epoch = train // batch
    total = steps_per_epoch * epochs
    peak = int(0.23 * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: triangle(i, 0.2, peak, total, 0.07))
    lookahead = Lookahead()  # every 5 steps, and onto the average at the last one
    padded = F.pad(norm_train, (2, 2, 2, 2), mode="reflect")
    flipped_once = torch.rand(train, device=device) < 0.5
    step = 0
    model.train()
    for epoch in range(epochs):
        whitening_layer(model).bias.requires_grad = epoch < WHITEN_BIAS_EPOCHS  # type: ignore[union-attr, unused-ignore]
        shifts = torch.randint(0, 5, (train, 2), device=device)
        epoch_images = shifted_crops(padded, shifts, (32, 32))
        mirror = flipped_once ^ bool(epoch % 2)
        epoch_images = torch.where(mirror[:, None, None, None], epoch_images.flip(-1), epoch_images)
        order = torch.randperm(train, device=device)
        for k in range(steps_per_epoch):
            idx = order[k * batch:(k + 1) * batch]
            loss = F.cross_entropy(model(epoch_images[idx]), labels[idx], label_smoothing=SMOOTHING,
                                   reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            lookahead.step(model, step, total)
    model.eval()
    correct = 0
    with torch.no_grad():
        for k in range(0, test, 2000):
            x = normalize(test_images[k:k + 2000])
            correct += int((tta_logits(model, x, "mirror_translate").argmax(1) == test_labels[k:k + 2000]).sum())
    _sync(device)
    return time.perf_counter() - start, correct / test


def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2048)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kit, ref = [], []
    for _ in range(args.repeats):
        seconds, kit_acc = toolkit_run(args.train, args.test, args.batch, args.epochs)
        kit.append(seconds)
        seconds, ref_acc = reference_run(args.train, args.test, args.batch, args.epochs, device)
        ref.append(seconds)
        print(f"toolkit {kit[-1]:.2f} s (test acc {kit_acc:.3f})  airbench loop {ref[-1]:.2f} s "
              f"(test acc {ref_acc:.3f})", flush=True)
    print(f"toolkit / airbench loop: {statistics.median(kit) / statistics.median(ref):.3f} (medians)")


if __name__ == "__main__":
    main()

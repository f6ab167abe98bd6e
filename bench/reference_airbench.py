"""An independent airbench94 (Jordan 2024) for the CPU: the reference of the "against the reference" row where the
published ``airbench`` package cannot run (it is CUDA-only). Written from the paper's description and its published
hyper-parameters; it imports nothing of the toolkit, so the row compares the toolkit with a separate
implementation, not with itself. The data is handed in as uint8 tensors (the same images both sides see).

    seconds, accuracy = train_and_evaluate(train_images, train_labels, test_images, test_labels, epochs=10)
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["train_and_evaluate"]

# airbench94's hyper-parameters, for a summed loss "per 1024 examples"
LR, MOMENTUM, WEIGHT_DECAY, BIAS_SCALER, SMOOTHING, WHITEN_BIAS_EPOCHS = 11.5, 0.85, 0.0153, 64.0, 0.2, 3
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def _conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(cin, cout)])
    return conv


def _norm(channels: int) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=0.4)
    norm.weight.requires_grad_(False)
    return norm


class Net(nn.Module):
    def __init__(self, widths: tuple[int, int, int] = (64, 256, 256)) -> None:
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, bias=True)
        self.whiten.weight.requires_grad_(False)
        layers: list[nn.Module] = []
        cin = 24
        for cout in widths:
            layers += [_conv(cin, cout), nn.MaxPool2d(2), _norm(cout), nn.GELU(), _conv(cout, cout), _norm(cout),
                       nn.GELU()]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(F.gelu(self.whiten(x)))
        return self.head(F.max_pool2d(x, 3).flatten(1)) / 9


def _whiten(net: Net, images: torch.Tensor, eps: float = 5e-4) -> None:
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    values, vectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    filters = (vectors.T / torch.sqrt(values + eps)[:, None]).flip(0).reshape(-1, 3, 2, 2)
    with torch.no_grad():
        net.whiten.weight.copy_(torch.cat([filters, -filters]))
        net.whiten.bias.zero_()  # type: ignore[union-attr, unused-ignore]


def _schedule(step: int, total: int) -> float:
    peak = int(0.23 * total)
    if step < peak:
        return 0.2 + 0.8 * step / peak
    return 1 + (0.07 - 1) * min(1.0, (step - peak) / max(1, total - peak))


def _predict(net: Net, x: torch.Tensor) -> torch.Tensor:
    """Mirror and one-pixel translate test-time augmentation."""
    def both(v: torch.Tensor) -> torch.Tensor:
        return net(v) + net(v.flip(-1))

    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return 0.5 * both(x) + 0.25 * (both(padded[..., :-2, :-2]) + both(padded[..., 2:, 2:]))


def train_and_evaluate(train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                       test_labels: torch.Tensor, epochs: int = 10, batch: int = 1024,
                       widths: tuple[int, int, int] = (64, 256, 256), seed: int = 0) -> tuple[float, float]:
    """Train from scratch and evaluate with test-time augmentation: (seconds, test accuracy). Timed from the
    whitening set-up to the last prediction, as airbench times itself."""
    torch.manual_seed(seed)
    net = Net(widths).to(memory_format=torch.channels_last)  # type: ignore[call-overload, unused-ignore]
    start = time.perf_counter()
    x = ((train_images.float() / 255 - MEAN) / STD).contiguous(memory_format=torch.channels_last)
    _whiten(net, x[:5000])
    kilostep = 1024 * (1 + 1 / (1 - MOMENTUM))
    lr, wd = LR / kilostep, WEIGHT_DECAY * batch / kilostep
    biases = [p for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters() if p.requires_grad]
    others = [p for p in net.parameters() if p.requires_grad and all(p is not b for b in biases)]
    optimizer = torch.optim.SGD([{"params": biases, "lr": lr * BIAS_SCALER, "weight_decay": wd / (lr * BIAS_SCALER)},
                                 {"params": others, "lr": lr, "weight_decay": wd / lr}], momentum=MOMENTUM,
                                nesterov=True)
    base = [g["lr"] for g in optimizer.param_groups]
    steps, total = 0, epochs * (len(x) // batch)
    average = {k: v.clone() for k, v in net.state_dict().items() if v.is_floating_point()}
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    flip_once = torch.rand(len(x)) < 0.5
    net.train()
    for epoch in range(epochs):
        net.whiten.bias.requires_grad_(epoch < WHITEN_BIAS_EPOCHS)  # type: ignore[union-attr, unused-ignore]
        dy, dx = torch.randint(0, 5, (2, len(x)))
        rows = (dy[:, None] + torch.arange(32))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(32))[:, None, None, :]
        crops = padded[torch.arange(len(x))[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
        crops = torch.where((flip_once ^ bool(epoch % 2))[:, None, None, None], crops.flip(-1), crops)
        order = torch.randperm(len(x))
        for k in range(len(x) // batch):
            idx = order[k * batch:(k + 1) * batch]
            loss = F.cross_entropy(net(crops[idx]), train_labels[idx], label_smoothing=SMOOTHING, reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            for group, peak in zip(optimizer.param_groups, base):
                group["lr"] = peak * _schedule(steps, total)
            if steps % 5 == 0 or steps == total:  # Lookahead: the average moves towards the weights
                decay = 1.0 if steps == total else 0.95 ** 5 * (steps / total) ** 3
                with torch.no_grad():
                    for key, value in net.state_dict().items():
                        if key in average:
                            average[key].lerp_(value, 1 - decay)
                            value.copy_(average[key])
    net.eval()
    correct = 0
    with torch.no_grad():
        for k in range(0, len(test_images), 2000):
            xs = ((test_images[k:k + 2000].float() / 255 - MEAN) / STD).contiguous(memory_format=torch.channels_last)
            correct += int((_predict(net, xs).argmax(1) == test_labels[k:k + 2000]).sum())
    return time.perf_counter() - start, correct / len(test_images)

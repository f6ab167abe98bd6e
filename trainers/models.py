"""Models for 32x32 images."""

from __future__ import annotations

import torch
import torch.nn as nn


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """ResNet-18 adapted to 32x32 inputs: a 3x3 stride-1 stem and no max-pool (ImageNet's stem would
    shrink CIFAR images to 8x8 before the first residual stage)."""
    from torchvision.models import resnet18  # here: importing torchvision costs ~2 s that the other models skip

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def tiny_cnn(num_classes: int = 10, width: int = 16) -> nn.Module:
    """A few-thousand-parameter CNN with BatchNorm: seconds per epoch on a CPU, for tests and demos."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2)]

    return nn.Sequential(*block(3, width), *block(width, 2 * width), *block(2 * width, 2 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


# --- the fast recipe's network (the airbench94 architecture, Jordan 2024) ----------------------------

#: Output channels of the fixed 2x2 whitening convolution: +/- the 12 eigen-directions of 2x2x3 patches.
WHITEN_CHANNELS = 24
#: The conv groups' widths of airbench94 (sized for an A100; configs/cifar_fast_cpu.yaml uses a quarter of them).
AIRBENCH_WIDTHS = (64, 256, 256)


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def _conv(cin: int, cout: int) -> nn.Conv2d:
    """3x3 convolution initialised as an identity on its first channels (dirac), the rest at random."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(cin, cout)])
    return conv


def _norm(channels: int) -> nn.BatchNorm2d:
    # Only the shift is learned (the scale stays 1); running statistics follow the batch fast (momentum 0.4).
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=0.4)
    norm.weight.requires_grad_(False)
    return norm


def _group(cin: int, cout: int) -> list[nn.Module]:
    return [_conv(cin, cout), nn.MaxPool2d(2), _norm(cout), nn.GELU(), _conv(cout, cout), _norm(cout), nn.GELU()]


def airbench_net(num_classes: int = 10, widths: tuple[int, int, int] = AIRBENCH_WIDTHS) -> nn.Sequential:
    """The network of the airbench94 recipe: a frozen 2x2 whitening convolution (set from the data by
    ``init_whitening``), three conv groups (conv, max-pool, BN, GELU, conv, BN, GELU), a 3x3 max-pool and a
    bias-free linear layer whose outputs are scaled by 1/9."""
    whiten = nn.Conv2d(3, WHITEN_CHANNELS, 2, padding=0, bias=True)
    whiten.weight.requires_grad_(False)
    assert whiten.bias is not None
    nn.init.zeros_(whiten.bias)
    return nn.Sequential(whiten, nn.GELU(), *_group(WHITEN_CHANNELS, widths[0]), *_group(widths[0], widths[1]),
                         *_group(widths[1], widths[2]), nn.MaxPool2d(3), nn.Flatten(),
                         nn.Linear(widths[2], num_classes, bias=False), _Scale(1 / 9))


def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set a (2*k, C, h, w) convolution to whiten the h x w patches of ``images`` (normalised, N x C x H x W):
    each filter pair is +/- one eigenvector of the patch covariance, divided by the square root of its
    eigenvalue."""
    c, h, w = conv.weight.shape[1:]
    patches = images.float().unfold(2, h, 1).unfold(3, w, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * h * w)
    covariance = patches.T @ patches / len(patches)
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    filters = (vectors.T / torch.sqrt(values + eps)[:, None]).flip(0).reshape(-1, c, h, w)
    with torch.no_grad():
        conv.weight.copy_(torch.cat([filters, -filters]))


def whitening_layer(model: nn.Module) -> nn.Conv2d:
    """The frozen first convolution of ``airbench_net``."""
    first = next(model.children(), None)
    if not isinstance(first, nn.Conv2d) or first.bias is None:
        raise TypeError(f"expected an airbench_net, whose first layer is the whitening convolution; got {first}")
    return first


def build_model(name: str, width: int, num_classes: int = 10,
                widths: tuple[int, int, int] = AIRBENCH_WIDTHS) -> nn.Module:
    """The model named by ``model.name`` (``width`` is the tiny CNN's, ``widths`` the airbench net's; CifarConfig.check
    rejects them for the other models)."""
    if name == "tiny":
        return tiny_cnn(num_classes, width)
    if name == "airbench":
        return airbench_net(num_classes, tuple(widths))  # type: ignore[arg-type]
    return cifar_resnet18(num_classes)

"""Models for 32x32 images."""

from __future__ import annotations

import torch.nn as nn
from torchvision.models import resnet18


def cifar_resnet18(num_classes: int = 10) -> nn.Module:
    """ResNet-18 adapted to 32x32 inputs: a 3x3 stride-1 stem and no max-pool (ImageNet's stem would
    shrink CIFAR images to 8x8 before the first residual stage)."""
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


def build_model(name: str, width: int, num_classes: int = 10) -> nn.Module:
    """The model named by ``model.name`` (``width`` is the tiny CNN's; CifarConfig.check rejects it for resnet18)."""
    if name == "tiny":
        return tiny_cnn(num_classes, width)
    return cifar_resnet18(num_classes)

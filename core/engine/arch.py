"""The network: torchvision's ResNet-18 with a `num_classes` head and no weights.

Its own module at the bottom of the engine, so that checkpoints (which rebuild a model) and
model (which reads checkpoints as starting weights) both import it, one way:
arch <- checkpoints <- data, model <- train.
"""

from __future__ import annotations

from torch import nn


def build_resnet18(num_classes: int) -> nn.Module:
    import torchvision  # its models package loads in about a second: only when one is built

    return torchvision.models.resnet18(weights=None, num_classes=num_classes)

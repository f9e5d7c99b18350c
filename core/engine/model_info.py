"""Facts about the ResNet-18 the app trains, without importing torch (the New run page
imports this at start-up): parameters per layer group, the size of each group's output, and
where torch caches the ImageNet weights. tests/test_app_pages.py checks both against core.engine.model on a real model."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

# torchvision ResNet-18 parameters per layer group (weights, biases, BatchNorm affine),
# computed once with core.engine.model.count_parameters(build_resnet18(n), (group,)).
# The fc head depends on the number of classes: 512 * n weights + n biases.
RESNET18_GROUP_PARAMS = {
    "conv1": 9_536,  # conv1 + bn1
    "layer1": 147_968,
    "layer2": 525_568,
    "layer3": 2_099_712,
    "layer4": 8_393_728,
}
FC_IN_FEATURES = 512
# torchvision.models.ResNet18_Weights.IMAGENET1K_V1's file name (core.engine.model uses this one).
IMAGENET_WEIGHTS_FILE = "resnet18-f37072fd.pth"


def resnet18_group_parameters(group: str, num_classes: int) -> int:
    """Parameters of one layer group of a ResNet-18 with `num_classes` outputs."""
    if group == "fc":
        return FC_IN_FEATURES * num_classes + num_classes
    return RESNET18_GROUP_PARAMS[group]


def resnet18_parameters(groups: Iterable[str], num_classes: int) -> int:
    """Parameters of the given layer groups (like core.engine.model.count_parameters)."""
    return sum(resnet18_group_parameters(g, num_classes) for g in groups)


# Channels of each group's output and its stride (input pixels per output pixel); conv1
# includes the max pool. fc has no map.
RESNET18_GROUP_OUTPUT = {"conv1": (64, 4), "layer1": (64, 4), "layer2": (128, 8),
                         "layer3": (256, 16), "layer4": (512, 32)}


def group_output_values(group: str, resolution: int) -> int:
    """Values in one image's output of `group` (channels x side x side) at `resolution`
    pixels: what the feature cache stores per image when the frozen prefix ends there.
    Each stride-2 step rounds up (padding 1), like the convolutions."""
    channels, stride = RESNET18_GROUP_OUTPUT[group]
    side = resolution
    for _ in range(stride.bit_length() - 1):
        side = (side + 1) // 2
    return channels * side * side


def torch_hub_dir() -> Path:
    """torch.hub.get_dir() without torch: $TORCH_HOME/hub, else $XDG_CACHE_HOME/torch/hub,
    else ~/.cache/torch/hub (the app never calls torch.hub.set_dir)."""
    torch_home = os.getenv("TORCH_HOME",
                           os.path.join(os.getenv("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(os.path.expanduser(torch_home)) / "hub"


def imagenet_weights_path() -> Path:
    """Where torch caches the ImageNet ResNet-18 weights (torch.hub.get_dir()'s checkpoints/):
    the one definition, core.engine.model reads the weights from here."""
    return torch_hub_dir() / "checkpoints" / IMAGENET_WEIGHTS_FILE


def load_refusal(exc: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in words to show a user. torch's
    own text for a pickle of arbitrary objects advises loading it with weights_only=False,
    which would run whatever code the file holds: that advice is never passed on."""
    text = str(exc)
    if "weights_only" in text or "Weights only" in text or "WeightsUnpickler" in text:
        return ("it holds Python objects other than tensors; it was not loaded, since "
                "loading it could run code")
    return text.splitlines()[0] if text.strip() else type(exc).__name__

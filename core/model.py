"""ResNet-18 with a new head: starting weights, layer groups, freezing, BatchNorm policy."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from .config import LAYER_GROUPS

# Modules of each layer group, by attribute name on torchvision's ResNet.
GROUP_MODULES: dict[str, tuple[str, ...]] = {
    "conv1": ("conv1", "bn1"),
    "layer1": ("layer1",),
    "layer2": ("layer2",),
    "layer3": ("layer3",),
    "layer4": ("layer4",),
    "fc": ("fc",),
}
IMAGENET_WEIGHTS_FILE = "resnet18-f37072fd.pth"  # torchvision's IMAGENET1K_V1 file name


class WeightsError(RuntimeError):
    """Starting weights cannot be had; the message says what to do instead."""


def build_resnet18(num_classes: int) -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


def group_modules(model: nn.Module, group: str) -> list[nn.Module]:
    return [getattr(model, name) for name in GROUP_MODULES[group]]


def group_parameters(model: nn.Module, group: str) -> list[nn.Parameter]:
    return [p for m in group_modules(model, group) for p in m.parameters()]


def count_parameters(model: nn.Module, groups: Iterable[str]) -> int:
    return sum(p.numel() for g in groups for p in group_parameters(model, g))


def set_trainable(model: nn.Module, groups: Sequence[str]) -> None:
    """requires_grad on exactly the parameters of `groups`."""
    for g in LAYER_GROUPS:
        for p in group_parameters(model, g):
            p.requires_grad_(g in groups)


def set_train_mode(model: nn.Module, trainable: Sequence[str], bn_policy: str) -> None:
    """model.train(), then frozen groups' BatchNorm layers back to eval when the policy is
    "eval": requires_grad=False alone does not stop running statistics from updating."""
    model.train()
    if bn_policy == "eval":
        for g in LAYER_GROUPS:
            if g not in trainable:
                for m in group_modules(model, g):
                    for mod in m.modules():
                        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                            mod.eval()


def frozen_prefix(trainable: Sequence[str]) -> list[str]:
    """Groups before the first trainable one (input side): these need no autograd."""
    prefix = []
    for g in LAYER_GROUPS[:-1]:  # fc is never part of the feature extractor prefix
        if g in trainable:
            break
        prefix.append(g)
    return prefix


def forward_prefix(model: nn.Module, x: torch.Tensor, groups: Sequence[str]) -> torch.Tensor:
    """Run the leading `groups` (in order, from the input)."""
    for g in groups:
        if g == "conv1":
            x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        else:
            x = getattr(model, g)(x)
    return x


def forward_suffix(model: nn.Module, x: torch.Tensor, skip: Sequence[str]) -> torch.Tensor:
    """Run the rest of the network after the prefix `skip`."""
    for g in LAYER_GROUPS[len(skip):-1]:
        x = forward_prefix(model, x, [g])
    x = torch.flatten(model.avgpool(x), 1)
    return model.fc(x)


# ---------------------------------------------------------------- starting weights


def imagenet_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_WEIGHTS_FILE


def imagenet_state_dict(download: bool = True) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet ResNet-18 weights, from the torch cache (downloaded once)."""
    import torchvision

    path = imagenet_cache_path()
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    if not download:
        raise WeightsError(_imagenet_help(path, "not in the cache"))
    try:
        weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, socket timeouts, hash mismatches
        raise WeightsError(_imagenet_help(path, f"download failed: {exc}")) from None


def _imagenet_help(path: Path, why: str) -> str:
    return (f"ImageNet weights for ResNet-18 are unavailable ({why}). Either place the file "
            f"{IMAGENET_WEIGHTS_FILE} (from torchvision's ResNet18_Weights.IMAGENET1K_V1) at "
            f"{path} (set TORCH_HOME to use another cache), or choose other starting weights: "
            f"'file' (a local .pth state_dict), 'run' (another run's best checkpoint), or "
            f"'random' (train from scratch).")


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A ResNet-18 state_dict from a .pth file: a raw state_dict or one of our checkpoints."""
    from .checkpoints import CheckpointError, read_checkpoint

    p = Path(path).expanduser()
    if not p.is_file():
        raise WeightsError(f"weights file {p} does not exist; check the path")
    try:
        return read_checkpoint(p).state_dict
    except CheckpointError:
        pass
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{p} is not a PyTorch weights file we can read safely ({exc})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or "conv1.weight" not in obj:
        raise WeightsError(f"{p} does not hold ResNet-18 weights (no conv1.weight)")
    return obj


def apply_backbone(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load every matching tensor; the head is kept only when its shape matches (same
    number of classes). Returns the names that were not loaded."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing_backbone = [k for k in own if not k.startswith("fc.") and k not in usable]
    if missing_backbone:
        raise WeightsError(f"the weights do not fit ResNet-18: {len(missing_backbone)} backbone "
                           f"tensors missing or of another shape (e.g. {missing_backbone[0]})")
    model.load_state_dict(usable, strict=False)
    return [k for k in own if k not in usable]


def build_model(num_classes: int, weights: str, weights_path: str = "",
                run_checkpoint: str | Path | None = None) -> tuple[nn.Module, str]:
    """ResNet-18 with a `num_classes` head and the chosen starting weights.
    Returns (model, description of where the weights came from)."""
    model = build_resnet18(num_classes)
    if weights == "random":
        return model, "random initialisation"
    if weights == "imagenet":
        state, desc = imagenet_state_dict(), "ImageNet (torchvision IMAGENET1K_V1)"
    elif weights == "file":
        state, desc = load_weights_file(weights_path), f"weights file {weights_path}"
    elif weights == "run":
        if run_checkpoint is None:
            raise WeightsError("the chosen run has no best checkpoint yet; pick a finished run")
        state, desc = load_weights_file(run_checkpoint), f"checkpoint {run_checkpoint}"
    else:
        raise WeightsError(f"unknown starting weights {weights!r}")
    not_loaded = apply_backbone(model, state)
    if any(k.startswith("fc.") for k in not_loaded):
        desc += " (new head for these classes)"
    return model, desc


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was chosen but no CUDA GPU is available; pick 'auto' or 'cpu'")
    if choice == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("device 'mps' was chosen but Apple's MPS is not available; pick 'auto' or 'cpu'")
    return torch.device(choice)


def physical_cores() -> int:
    """Physical cores (not hyper-threads): one torch thread per core is fastest for convs."""
    import os

    try:
        cores = set()
        with open("/proc/cpuinfo") as f:
            phys = core = None
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    cores.add((phys, core))
        avail = len(os.sched_getaffinity(0))
        return max(1, min(len(cores) or avail, avail))
    except (OSError, AttributeError):
        return max(1, (os.cpu_count() or 2))

"""ResNet-18 with a new head: starting weights, layer groups, freezing, BatchNorm policy."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core import process
from core.config import LAYER_GROUPS, frozen_prefix  # noqa: F401  (re-exported: the engine's callers import it here)
from core.engine.arch import build_resnet18  # noqa: F401  (re-exported: callers build it here)
from core.engine.checkpoints import CheckpointError, read_checkpoint
from core.engine.data import IMAGENET_MEAN, IMAGENET_STD
from core.engine.model_info import IMAGENET_WEIGHTS_FILE, imagenet_weights_path, load_refusal

# Modules of each layer group, by attribute name on torchvision's ResNet.
GROUP_MODULES: dict[str, tuple[str, ...]] = {
    "conv1": ("conv1", "bn1"),
    "layer1": ("layer1",),
    "layer2": ("layer2",),
    "layer3": ("layer3",),
    "layer4": ("layer4",),
    "fc": ("fc",),
}


class WeightsError(RuntimeError):
    """Starting weights cannot be had; the message says what to do instead."""


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


def forward_prefix(model: nn.Module, x: torch.Tensor, groups: Sequence[str]) -> torch.Tensor:
    """Run the leading `groups` (in order, from the input)."""
    for g in groups:
        x = forward_group(model, g, x)
    return x


def forward_group(model: nn.Module, group: str, x: torch.Tensor) -> torch.Tensor:
    """One layer group. Residual stages whose output is a single pixel (layer4 at 32x32)
    run as matrix products: exactly the same function, without the convolution overhead."""
    if group == "conv1":
        return model.maxpool(model.relu(model.bn1(model.conv1(x))))
    if group == "fc":
        return model.fc(torch.flatten(model.avgpool(x), 1))
    for block in getattr(model, group):
        x = block_forward(block, x)
    return x


def forward_suffix(model: nn.Module, x: torch.Tensor, skip: Sequence[str]) -> torch.Tensor:
    """Run the rest of the network after the prefix `skip`."""
    for g in LAYER_GROUPS[len(skip):-1]:
        x = forward_group(model, g, x)
    return forward_group(model, "fc", x)


# ---------------------------------------------------------------- single-pixel fast path


def _single_pixel_taps(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int] | None:
    """For a convolution whose output is 1x1 on an h x w input: how many input rows and
    columns (from the top-left) the one output pixel sees. Every other input pixel is
    skipped by the stride and every other kernel tap meets only zero padding. None when
    the output is not 1x1 (or the conv is not a plain zero-padded one)."""
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.dilation != (1, 1) \
            or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    if ((h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1) != (1, 1):
        return None
    # The output pixel sees input rows -ph .. kh-1-ph, i.e. rows 0 .. min(h, kh-ph)-1.
    return min(h, kh - ph), min(w, kw - pw)


def conv_single_pixel(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for an output of 1x1, as one matrix product over the input pixels and taps
    that meet. At 32x32 input, layer4 works on 2x2 -> 1x1 maps: its convolutions reduce
    exactly to this, and autograd through the weight slice gives the same gradient (zero
    for the taps that only ever see padding)."""
    n, c = x.shape[:2]
    hs, ws = _single_pixel_taps(conv, x.shape[-2], x.shape[-1])  # type: ignore[misc]
    ph, pw = conv.padding  # type: ignore[misc]
    weight = conv.weight[:, :, ph:ph + hs, pw:pw + ws].reshape(conv.out_channels, c * hs * ws)
    inp = x[:, :, :hs, :ws].reshape(n, c * hs * ws)
    return F.linear(inp, weight, conv.bias).view(n, conv.out_channels, 1, 1)


def _block_is_single_pixel(block: nn.Module, x: torch.Tensor) -> bool:
    h, w = x.shape[-2:]
    if type(block).__name__ != "BasicBlock" or _single_pixel_taps(block.conv1, h, w) is None:
        return False
    ds = block.downsample
    if ds is not None and not (isinstance(ds, nn.Sequential) and len(ds) == 2
                               and _single_pixel_taps(ds[0], h, w) is not None):
        return False
    return _single_pixel_taps(block.conv2, 1, 1) is not None


def block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision BasicBlock, through the single-pixel path when it applies."""
    if not _block_is_single_pixel(block, x):
        return block(x)
    out = block.relu(block.bn1(conv_single_pixel(block.conv1, x)))
    out = block.bn2(conv_single_pixel(block.conv2, out))
    identity = x if block.downsample is None else block.downsample[1](
        conv_single_pixel(block.downsample[0], x))
    return block.relu(out + identity)


# ---------------------------------------------------------------- frozen prefix for inference


class FoldedPrefix(nn.Module):
    """A frozen prefix with every BatchNorm folded into the convolution before it, for
    inference only (eval-mode BN is an affine map per channel, so conv+BN is one conv).
    A snapshot: build it again whenever the model's weights change."""

    def __init__(self, model: nn.Module, groups: Sequence[str]):
        super().__init__()
        self.groups = list(groups)
        self.steps = nn.ModuleList()
        for g in self.groups:
            if g == "conv1":
                self.steps.append(nn.Sequential(fold_conv_bn(model.conv1, model.bn1),
                                                nn.ReLU(inplace=True), model.maxpool))
            else:
                self.steps.append(nn.ModuleList(_FoldedBlock(b) for b in getattr(model, g)))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            if isinstance(step, nn.ModuleList):
                for block in step:
                    x = block(x)
            else:
                x = step(x)
        return x


class _FoldedBlock(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.conv1 = fold_conv_bn(block.conv1, block.bn1)
        self.conv2 = fold_conv_bn(block.conv2, block.bn2)
        ds = block.downsample
        self.downsample = fold_conv_bn(ds[0], ds[1]) if ds is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(_conv(self.conv1, x), inplace=True)
        out = _conv(self.conv2, out)
        identity = x if self.downsample is None else _conv(self.downsample, x)
        return F.relu(out.add_(identity), inplace=True)


def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if _single_pixel_taps(conv, x.shape[-2], x.shape[-1]) is not None:
        return conv_single_pixel(conv, x)
    return conv(x)


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> nn.Conv2d:
    """A new conv computing bn(conv(x)) with bn in eval mode (its running statistics)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    if conv.weight.is_contiguous(memory_format=torch.channels_last):
        fused.to(memory_format=torch.channels_last)
    return fused.requires_grad_(False)


# ---------------------------------------------------------------- starting weights


def imagenet_state_dict(download: bool = True) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet ResNet-18 weights, from the torch cache (downloaded once)."""
    import torchvision

    path = imagenet_weights_path()
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
        raise WeightsError(f"{p} is not a PyTorch weights file we can read safely "
                           f"({load_refusal(exc)})") from None
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
    extra = [k for k in state if not k.startswith("fc.") and k not in own]
    if extra:  # e.g. a ResNet-34: every ResNet-18 key exists there too, plus more blocks
        raise WeightsError(f"the weights are not ResNet-18's: {len(extra)} tensors ResNet-18 does "
                           f"not have (e.g. {extra[0]}); use a ResNet-18 state_dict")
    if missing_backbone:
        raise WeightsError(f"the weights do not fit ResNet-18: {len(missing_backbone)} backbone "
                           f"tensors missing or of another shape (e.g. {missing_backbone[0]})")
    model.load_state_dict(usable, strict=False)
    return [k for k in own if k not in usable]


@dataclass(frozen=True)
class Normalization:
    """The per-channel mean and std (of 0..1 pixel values) a backbone was trained with: its
    input must be normalised the same way. ImageNet weights were trained with ImageNet's."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source: str = "ImageNet statistics"


def _channel_stats(value: Any) -> tuple[float, float, float] | None:
    if (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        return (float(value[0]), float(value[1]), float(value[2]))
    return None


def file_normalization(path: str | Path) -> Normalization:
    """The statistics a weights file says its backbone was trained with: one of our
    checkpoints carries its preprocess; a plain file may hold {"state_dict": ...,
    "mean": [r, g, b], "std": [r, g, b]} (or the two under "preprocess"). A file that says
    nothing gets ImageNet's (what torchvision-style ResNet-18 weights use)."""
    p = Path(path).expanduser()
    try:
        stats: Any = read_checkpoint(p).preprocess
        what = f"the checkpoint's preprocessing ({p.name})"
    except CheckpointError:
        try:
            stats = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:
            return Normalization()  # load_weights_file says what is wrong with the file
        what = f"the weights file's statistics ({p.name})"
        if isinstance(stats, dict) and isinstance(stats.get("preprocess"), dict):
            stats = stats["preprocess"]
    if not isinstance(stats, dict):
        return Normalization()
    mean, std = _channel_stats(stats.get("mean")), _channel_stats(stats.get("std"))
    if mean is None or std is None or not all(v > 0 for v in std):
        return Normalization()
    return Normalization(mean, std, what)


def starting_normalization(weights: str, weights_path: str = "",
                           run_checkpoint: str | Path | None = None) -> Normalization:
    """How the input is normalised for these starting weights: a run's checkpoint or a
    weights file that says so gives its own statistics; ImageNet and random weights (which
    have none of their own) keep ImageNet's."""
    if weights == "file" and weights_path:
        return file_normalization(weights_path)
    if weights == "run" and run_checkpoint is not None:
        return file_normalization(run_checkpoint)
    return Normalization()


@dataclass
class StartingModel:
    model: nn.Module
    description: str  # where the weights came from
    normalization: Normalization  # what its input must be normalised with


def build_model(num_classes: int, weights: str, weights_path: str = "",
                run_checkpoint: str | Path | None = None) -> StartingModel:
    """ResNet-18 with a `num_classes` head and the chosen starting weights, with the input
    normalisation those weights were trained with."""
    model = build_resnet18(num_classes)
    if weights == "random":
        return StartingModel(model, "random initialisation", Normalization())
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
    normalization = starting_normalization(weights, weights_path, run_checkpoint)
    if normalization != Normalization():
        desc += f"; input normalised with {normalization.source}"
    return StartingModel(model, desc, normalization)


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
    return process.physical_cores()

"""Grad-CAM: which parts of the picture pushed the model towards a class.

Grad-CAM (Selvaraju et al., 2017) weights each channel of a convolutional block's output
by the average gradient of the class score with respect to that channel, sums, keeps the
positive part and scales it to [0, 1]. We hook ResNet-18's last block (`layer4`) by
default: its channels are the most class-specific, but its grid is coarse (the input side
divided by 32, so 1x1 at 32 px and 7x7 at 224 px); `grid` in the result says how coarse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn


@dataclass
class GradCam:
    heatmap: np.ndarray  # float32 H x W in [0, 1], H x W = the model's input size
    class_index: int  # the class the map explains
    grid: tuple[int, int]  # the hooked block's spatial size (rows, cols) before upsampling
    layer: str


def grad_cam(model: nn.Module, x: torch.Tensor, class_index: int | None = None,
             layer: str = "layer4") -> GradCam:
    """Grad-CAM of `model` (eval mode) for one normalised input `x` (1 x 3 x H x W).

    `class_index` defaults to the predicted class. The model's parameters are not changed
    and no gradient is left on them.
    """
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"grad_cam expects one image as a 1 x 3 x H x W tensor, got {tuple(x.shape)}")
    block = getattr(model, layer)
    captured: dict[str, torch.Tensor] = {}

    def keep_output(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        captured["activation"] = output
        # A tensor hook (not a module backward hook) also works when the block's own
        # parameters are frozen: the gradient still flows through its output.
        output.register_hook(lambda g: captured.__setitem__("gradient", g))

    handle = block.register_forward_hook(keep_output)
    try:
        with torch.enable_grad():
            # requires_grad on the input builds the graph even if every parameter is frozen.
            inp = x.detach().clone().requires_grad_(True)
            logits = model(inp)
            if class_index is None:
                class_index = int(logits[0].argmax())
            if not 0 <= class_index < logits.shape[1]:
                raise ValueError(f"class index {class_index} is outside 0..{logits.shape[1] - 1}")
            # autograd.grad instead of .backward(): parameters' .grad stay untouched.
            torch.autograd.grad(logits[0, class_index], inp)
    finally:
        handle.remove()

    activation = captured["activation"].detach()[0]  # C x h x w
    gradient = captured["gradient"].detach()[0]  # C x h x w
    weights = gradient.mean(dim=(1, 2))  # one weight per channel
    cam = torch.relu((weights[:, None, None] * activation).sum(dim=0))  # h x w
    grid = (int(cam.shape[0]), int(cam.shape[1]))
    h, w = x.shape[2], x.shape[3]
    cam = nn.functional.interpolate(cam[None, None], size=(h, w), mode="bilinear",
                                    align_corners=False)[0, 0]
    # Scaled by the peak, not min-max: a uniform map (always the case on a 1x1 grid) means
    # "all of the picture counted equally", which min-max scaling would turn into zeros.
    peak = float(cam.max())
    # All-zero map (no positive evidence): return zeros rather than dividing by zero.
    heatmap = (cam / peak if peak > 1e-12 else torch.zeros_like(cam)).clamp(0.0, 1.0)
    return GradCam(heatmap.numpy().astype(np.float32), int(class_index), grid, layer)


# A small perceptually ordered colour ramp (dark blue -> cyan -> yellow -> red), so the
# heat map needs no plotting library. Anchors at 0, 1/3, 2/3, 1.
_RAMP = np.array([[20, 30, 120], [40, 190, 220], [250, 220, 40], [220, 30, 30]], dtype=np.float32)


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """H x W values in [0, 1] -> H x W x 3 uint8 colours."""
    t = np.clip(heatmap, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_RAMP) - 2)
    frac = (t - lo)[..., None]
    rgb = _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac
    return rgb.round().astype(np.uint8)


def overlay(image: Image.Image, heatmap: np.ndarray, size: int = 256, alpha: float = 0.5) -> Image.Image:
    """The heat map blended over `image` (the model's view, square), both resized to
    `size` x `size` pixels for display. `alpha` is the heat map's weight (0..1)."""
    base = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    heat_small = Image.fromarray((np.clip(heatmap, 0, 1) * 255).astype(np.uint8), "L")
    heat = np.asarray(heat_small.resize((size, size), Image.Resampling.BILINEAR),
                      dtype=np.float32) / 255.0
    colours = Image.fromarray(colorize(heat), "RGB")
    return Image.blend(base, colours, alpha)

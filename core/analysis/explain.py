"""Grad-CAM: which parts of the picture pushed the model towards a class.

Grad-CAM (Selvaraju et al., 2017) weights each channel of a convolutional block's output
by the average gradient of the class score with respect to that channel, sums, keeps the
positive part and scales it to [0, 1]. We hook ResNet-18's last block (`layer4`) by
default: its channels are the most class-specific, but its grid is coarse (the input side
divided by 32, so 1x1 at 32 px and 7x7 at 224 px); `grid` in the result says how coarse.

A map on a grid coarser than MIN_GRID x MIN_GRID says nothing about *where* (at 32 px it
is one uniform tint), so `explain` then measures occlusion sensitivity at the model's
input size instead (Zeiler & Fergus, 2014): cover one patch of the picture at a time with
the data set's mean colour and see how much the model's confidence in the class drops.
When no patch lowers it, there is nothing to show and the explanation says so.
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


MIN_GRID = 4  # Grad-CAM on a coarser grid than 4 x 4 cannot say where
# Occlusion patches: a quarter of the side, moved by an eighth (7 x 7 positions), so each
# pixel is covered by up to 4 patches and the map is smoother than the patch grid.
OCCLUSION_PATCH_FRACTION, OCCLUSION_STRIDE_FRACTION = 1 / 4, 1 / 8
MIN_LOG_PROB_DROP = 1e-3  # nats: a patch whose covering lowers the score less counts as 0


@dataclass
class Explanation:
    """What the model looked at, as a page shows it: a map at the input size with the
    method that made it and what it means, or no map and the plain reason why."""

    heatmap: np.ndarray | None  # float32 H x W in [0, 1] (H x W = the model's input), or None
    class_index: int
    method: str  # "grad-cam", "occlusion" or "none"
    meaning: str  # how to read the map, or why there is none, in plain words

    @property
    def available(self) -> bool:
        return self.heatmap is not None


def layer_grid(model: nn.Module, side: int, layer: str = "layer4") -> tuple[int, int]:
    """The spatial size of `layer`'s output for a `side` x `side` input."""
    shape: dict[str, tuple[int, int]] = {}
    handle = getattr(model, layer).register_forward_hook(
        lambda _m, _i, out: shape.__setitem__("hw", (int(out.shape[2]), int(out.shape[3]))))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, side, side))
    finally:
        handle.remove()
    return shape["hw"]


def occlusion_map(model: nn.Module, x: torch.Tensor, class_index: int,
                  batch_size: int = 64) -> np.ndarray:
    """How much covering each part of `x` (1 x 3 x H x W, normalised) lowers the model's
    log-probability of `class_index`, per pixel (mean over the patches that cover it),
    in nats; 0 where covering did not lower it. Covered pixels are set to 0, which after
    normalisation is the data set's mean colour."""
    _, _, h, w = x.shape
    ph, pw = max(1, round(h * OCCLUSION_PATCH_FRACTION)), max(1, round(w * OCCLUSION_PATCH_FRACTION))
    sh, sw = max(1, round(h * OCCLUSION_STRIDE_FRACTION)), max(1, round(w * OCCLUSION_STRIDE_FRACTION))
    boxes = [(top, left) for top in range(0, h - ph + 1, sh) for left in range(0, w - pw + 1, sw)]
    with torch.no_grad():
        base = torch.log_softmax(model(x), 1)[0, class_index]
        drops = []
        for i in range(0, len(boxes), batch_size):
            batch = x.repeat(len(boxes[i:i + batch_size]), 1, 1, 1)
            for j, (top, left) in enumerate(boxes[i:i + batch_size]):
                batch[j, :, top:top + ph, left:left + pw] = 0.0
            drops.append(base - torch.log_softmax(model(batch), 1)[:, class_index])
        drop = torch.cat(drops)
    total, count = torch.zeros(h, w), torch.zeros(h, w)
    for d, (top, left) in zip(drop.tolist(), boxes):
        total[top:top + ph, left:left + pw] += d
        count[top:top + ph, left:left + pw] += 1
    return (total / count.clamp(min=1)).clamp(min=0.0).numpy().astype(np.float32)


def explain(model: nn.Module, x: torch.Tensor, class_index: int | None = None,
            layer: str = "layer4", class_name: str = "this class") -> Explanation:
    """What pushed `model` (eval mode) towards `class_index` (default: the predicted one)
    for one normalised input `x` (1 x 3 x H x W): Grad-CAM when `layer`'s grid is at least
    MIN_GRID x MIN_GRID, occlusion sensitivity at the input size when it is coarser, and no
    map (with the reason) when covering no part of the picture lowers the score. Never a
    map that means nothing."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"explain expects one image as a 1 x 3 x H x W tensor, got {tuple(x.shape)}")
    grid = layer_grid(model, int(x.shape[2]), layer)
    if min(grid) >= MIN_GRID:
        cam = grad_cam(model, x, class_index, layer)
        if float(cam.heatmap.max()) > 0.0:
            return Explanation(cam.heatmap, cam.class_index, "grad-cam", (
                f"Warm colours (yellow, red) mark the parts of the picture that pushed the "
                f"model towards {class_name}; blue parts mattered little (Grad-CAM on "
                f"{layer}'s {grid[0]} × {grid[1]} grid)."))
        class_index = cam.class_index
    if class_index is None:
        with torch.no_grad():
            class_index = int(model(x)[0].argmax())
    drop = occlusion_map(model, x, class_index)
    peak = float(drop.max())
    side = f"{x.shape[2]} × {x.shape[3]}"
    if peak < MIN_LOG_PROB_DROP:
        return Explanation(None, class_index, "none", (
            f"No explanation available: covering any one part of the {side}-pixel picture "
            f"did not make the model less sure of {class_name}, so no part stands out."))
    coarse = (f" The last layer sees the picture as a {grid[0]} × {grid[1]} grid, too coarse "
              f"for a map of its own, so the picture was tested patch by patch instead."
              if min(grid) < MIN_GRID else "")
    return Explanation(drop / peak, class_index, "occlusion", (
        f"Warm colours (yellow, red) mark the parts whose covering made the model least sure "
        f"of {class_name}: it relied on them. Blue parts could be hidden without changing its "
        f"mind.{coarse}"))


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

"""Grad-CAM: shape and range of the map, that it points where the evidence is, and that it
leaves the model as it found it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from core.analysis.explain import colorize, grad_cam, overlay
from core.engine.model import build_resnet18

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return build_resnet18(4).eval()


@pytest.mark.parametrize("side, grid", [(32, 1), (64, 2), (96, 3)])
def test_heatmap_has_input_shape_and_unit_range(resnet, side, grid):
    x = torch.randn(1, 3, side, side)
    cam = grad_cam(resnet, x)
    assert cam.heatmap.shape == (side, side)
    assert cam.heatmap.dtype == np.float32
    assert cam.heatmap.min() >= 0.0 and cam.heatmap.max() <= 1.0
    assert cam.grid == (grid, grid)  # layer4 downsamples by 32
    assert cam.layer == "layer4"
    # The explained class defaults to the predicted one.
    with torch.no_grad():
        assert cam.class_index == int(resnet(x).argmax())


def test_nonzero_map_peaks_at_one_and_class_can_be_chosen(resnet):
    torch.manual_seed(2)
    x = torch.randn(1, 3, 96, 96)
    maps = [grad_cam(resnet, x, class_index=c) for c in range(4)]
    assert [m.class_index for m in maps] == [0, 1, 2, 3]
    for m in maps:
        assert m.heatmap.max() == pytest.approx(1.0)
    # Different classes are explained by different evidence.
    assert not all(np.allclose(maps[0].heatmap, m.heatmap) for m in maps[1:])


def test_leaves_no_gradients_or_hooks_and_works_with_frozen_weights(resnet):
    for p in resnet.parameters():
        p.requires_grad_(False)
    try:
        cam = grad_cam(resnet, torch.randn(1, 3, 64, 64))
    finally:
        for p in resnet.parameters():
            p.requires_grad_(True)
    assert cam.heatmap.shape == (64, 64)
    assert all(p.grad is None for p in resnet.parameters())
    assert not resnet.layer4._forward_hooks


def test_rejects_batches_and_bad_class_index(resnet):
    with pytest.raises(ValueError, match="one image"):
        grad_cam(resnet, torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="class index"):
        grad_cam(resnet, torch.randn(1, 3, 32, 32), class_index=4)


class PassThrough(nn.Module):
    """A toy model whose 'layer4' is the input itself and whose class 0 score is the mean
    of channel 0: Grad-CAM for class 0 must then be channel 0 of the image."""

    def __init__(self):
        super().__init__()
        self.layer4 = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.layer4.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        self.fc = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))

    def forward(self, x):
        return self.fc(self.layer4(x).mean(dim=(2, 3)))


def test_map_points_at_the_evidence_in_the_right_place():
    x = torch.zeros(1, 3, 8, 8)
    x[0, 0, :4, :4] = 1.0  # class-0 evidence in the top-left quadrant
    x[0, 1, 4:, 4:] = 1.0  # class-1 evidence bottom-right
    cam0 = grad_cam(PassThrough(), x, class_index=0).heatmap
    cam1 = grad_cam(PassThrough(), x, class_index=1).heatmap
    assert cam0[:4, :4].min() == pytest.approx(1.0) and cam0[4:, 4:].max() == 0.0
    assert cam1[4:, 4:].min() == pytest.approx(1.0) and cam1[:4, :4].max() == 0.0
    # No evidence anywhere: an all-zero map, not a division by zero.
    blank = grad_cam(PassThrough(), torch.zeros(1, 3, 8, 8), class_index=0).heatmap
    assert not np.isnan(blank).any() and blank.max() == 0.0


def test_colorize_ends_and_overlay_size():
    ramp = colorize(np.array([[0.0, 1.0, 2.0, -1.0]]))
    assert ramp.shape == (1, 4, 3) and ramp.dtype == np.uint8
    assert ramp[0, 0, 2] > ramp[0, 0, 0]  # cold end is blue
    assert ramp[0, 1, 0] > ramp[0, 1, 2]  # hot end is red
    assert (ramp[0, 2] == ramp[0, 1]).all() and (ramp[0, 3] == ramp[0, 0]).all()  # clipped
    img = Image.new("RGB", (32, 32), (0, 0, 0))
    heat = np.zeros((32, 32), np.float32)
    heat[:16] = 1.0
    out = overlay(img, heat, size=128, alpha=0.5)
    assert out.size == (128, 128) and out.mode == "RGB"
    top, bottom = np.asarray(out)[10, 64], np.asarray(out)[118, 64]
    assert top[0] > bottom[0]  # the hot half is redder


# ---------------------------------------------------------------- explain: never a map that means nothing


class Quadrants(nn.Module):
    """A toy whose last block is a 1 x 1 grid (as ResNet-18's at 32 px): class 0's score is
    channel 0 in the top-left quadrant, class 1's channel 1 in the bottom-right."""

    def __init__(self):
        super().__init__()
        self.layer4 = nn.Identity()

    def forward(self, x):
        h = x.shape[2] // 2
        feats = torch.stack([x[:, 0, :h, :h].mean((1, 2)), x[:, 1, h:, h:].mean((1, 2))], 1)
        return 4 * self.layer4(feats[:, :, None, None]).flatten(1)


def test_coarse_grid_uses_occlusion_that_points_at_the_evidence():
    from core.analysis.explain import explain

    x = torch.zeros(1, 3, 32, 32)
    x[0, 0, :16, :16] = 1.0
    x[0, 1, 16:, 16:] = 1.0
    e = explain(Quadrants(), x, class_index=0)
    assert e.method == "occlusion" and e.available and e.heatmap.shape == (32, 32)
    assert "too coarse" in e.meaning
    assert e.heatmap[:12, :12].mean() > 0.5 and e.heatmap[20:, 20:].max() == 0.0
    e1 = explain(Quadrants(), x, class_index=1)
    assert e1.heatmap[20:, 20:].mean() > 0.5 and e1.heatmap[:12, :12].max() == 0.0


def test_resnet_at_32_px_is_never_a_uniform_tint(resnet):
    from core.analysis.explain import explain

    torch.manual_seed(1)
    e = explain(resnet, torch.randn(1, 3, 32, 32))
    assert e.method == "occlusion"  # layer4 is 1 x 1 here: no Grad-CAM
    assert e.heatmap.shape == (32, 32) and float(e.heatmap.max()) == pytest.approx(1.0)
    assert float(e.heatmap.min()) < 1.0  # it says where, not "everywhere"
    # A fine enough grid (4 x 4 at 128 px) keeps Grad-CAM.
    assert explain(resnet, torch.randn(1, 3, 128, 128)).method == "grad-cam"


def test_no_evidence_anywhere_says_so_in_words():
    from core.analysis.explain import explain

    x = torch.zeros(1, 3, 32, 32)  # covering a patch with 0 changes nothing
    e = explain(Quadrants(), x, class_index=0, class_name="a red square")
    assert e.method == "none" and not e.available and e.heatmap is None
    assert e.meaning.startswith("No explanation available") and "a red square" in e.meaning

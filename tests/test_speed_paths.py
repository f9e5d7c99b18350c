"""Correctness of the fast paths: they must compute what the plain code computes.

No timing assertions here: speed is measured by `python -m benchmarks.throughput`.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core import config as cfgmod
from core.analysis.speed import estimate_epoch_seconds, measured_images_per_s, model_epoch_seconds
from core.engine.data import ImageSet, Preprocess, augment_batch, load_splits
from core.engine.model import (
    FoldedPrefix,
    block_forward,
    build_resnet18,
    conv_single_pixel,
    forward_prefix,
    forward_suffix,
    set_trainable,
)
from core.engine.train import (
    CPU_BF16_ENV,
    Runtime,
    compute_features,
    cpu_flags,
    cpu_has_native_bf16,
    cpu_runtime,
    cuda_runtime,
    default_runtime,
    evaluate,
    make_optimizer,
    make_scheduler,
    train_one_epoch,
)
from core.runs.store import RunResults

torch.set_num_threads(1)
CPU = torch.device("cpu")
PREFIX3 = ["conv1", "layer1", "layer2", "layer3"]


def _model_with_real_bn(seed=0, classes=10):
    """Random ResNet-18 whose BN layers have non-trivial statistics and affine params, so
    folding them would show any mistake."""
    torch.manual_seed(seed)
    m = build_resnet18(classes)
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            mod.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            mod.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            mod.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return m


@pytest.fixture(scope="module")
def splits(tiny_folder):
    return load_splits("folder", str(tiny_folder), Preprocess(32), val_fraction=0.25, seed=0)


# ---------------------------------------------------------------- augmentation


def test_augment_batch_equals_pad_crop_flip_per_image():
    """Same draws, same result as torchvision's RandomCrop(32, padding=4) + hflip applied
    image by image (zero padding, crop at the drawn offset, flip when drawn)."""
    import torchvision.transforms.functional as TF

    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    out = augment_batch(x, torch.Generator().manual_seed(7))
    # Replay the generator's draws in augment_batch's order.
    replay = torch.Generator().manual_seed(7)
    oy = torch.randint(0, 9, (16,), generator=replay)
    ox = torch.randint(0, 9, (16,), generator=replay)
    flip = torch.rand(16, generator=replay) < 0.5
    for i in range(16):
        ref = TF.crop(TF.pad(x[i], [4, 4, 4, 4], fill=0), int(oy[i]), int(ox[i]), 32, 32)
        if flip[i]:
            ref = TF.hflip(ref)
        assert torch.equal(out[i], ref), f"image {i} differs"
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert 0 < int(flip.sum()) < 16 and len(set(oy.tolist())) > 1  # the draw really varies


def test_augment_batch_keeps_pixels_and_pads_with_zeros():
    x = torch.full((64, 3, 32, 32), 200, dtype=torch.uint8)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    values = set(out.unique().tolist())
    assert values <= {0, 200} and 200 in values
    # A centred crop (offset 4) with no padding visible exists for pad 0 too: identity.
    same = augment_batch(x, torch.Generator().manual_seed(0), pad=0, flip=False)
    assert torch.equal(same, x)


# ---------------------------------------------------------------- model fast paths


def test_single_pixel_conv_equals_conv_for_layer4_shapes():
    torch.manual_seed(0)
    for conv, hw in ((nn.Conv2d(8, 6, 3, stride=2, padding=1), 2),
                     (nn.Conv2d(8, 6, 3, stride=1, padding=1, bias=False), 1),
                     (nn.Conv2d(8, 6, 1, stride=2, bias=False), 2)):
        x = torch.randn(5, 8, hw, hw)
        torch.testing.assert_close(conv_single_pixel(conv, x), conv(x), rtol=1e-5, atol=1e-6)


def test_layer4_fast_path_matches_modules_forward_backward_and_bn_stats():
    a = _model_with_real_bn()
    b = copy.deepcopy(a)
    a.train(), b.train()
    x = torch.randn(12, 3, 32, 32)
    out_a = a(x)  # torchvision's own forward: convolutions everywhere
    out_b = forward_suffix(b, x, [])  # ours: layer4 as matrix products at 1x1
    torch.testing.assert_close(out_b, out_a, rtol=1e-4, atol=1e-5)
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        # Float rounding differs in the summation order; compare whole gradients.
        rel = ((pb.grad - pa.grad).norm() / pa.grad.norm()).item()
        assert rel < 1e-3, f"{name}: gradient differs by {rel:.1e} (relative)"
    for (name, ba), bb in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(bb, ba, rtol=1e-4, atol=1e-6, msg=name)


def test_block_forward_falls_back_when_maps_are_larger():
    m = _model_with_real_bn().eval()
    x = torch.randn(2, 256, 4, 4)  # layer4 input at 64x64: output 2x2, not a single pixel
    with torch.no_grad():
        torch.testing.assert_close(block_forward(m.layer4[0], x), m.layer4[0](x))


@pytest.mark.parametrize("prefix", [PREFIX3, PREFIX3 + ["layer4"], ["conv1"]])
def test_folded_prefix_equals_eval_mode_prefix(prefix):
    m = _model_with_real_bn().eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        ref = forward_prefix(m, x, prefix)
        folded = FoldedPrefix(m, prefix)(x)
        cl = FoldedPrefix(m, prefix).to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(folded, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in FoldedPrefix(m, prefix).parameters())


# ---------------------------------------------------------------- feature cache


def _images(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.randint(0, 3, (n,), generator=g), ["a", "b", "c"])


@pytest.mark.parametrize("prefix", [PREFIX3, ["conv1", "layer1", "layer2"], PREFIX3 + ["layer4"]])
def test_feature_cache_logits_equal_full_forward(prefix):
    m = _model_with_real_bn(classes=3).eval()
    data, pre = _images(), Preprocess(32)
    feats = compute_features(m, data, prefix, pre, Runtime(CPU))
    with torch.no_grad():
        cached = forward_suffix(m, feats.float(), prefix)
        full = m(pre.normalize(data.images))
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)


def test_feature_cache_in_reduced_precision_stays_close():
    m = _model_with_real_bn(classes=3).eval()
    data, pre = _images(), Preprocess(32)
    rt = Runtime(CPU, frozen_dtype=torch.bfloat16, frozen_channels_last=True)
    feats = compute_features(m, data, PREFIX3, pre, rt)
    assert feats.dtype == torch.bfloat16  # half the memory of fp32 features
    with torch.no_grad():
        cached = forward_suffix(m, feats.float(), PREFIX3)
        full = m(pre.normalize(data.images))
    rel = (cached - full).norm() / full.norm()
    assert rel < 0.05


# ---------------------------------------------------------------- runtime choices


def _train_epoch(runtime, splits, groups=("layer4", "fc"), seed=0):
    torch.manual_seed(seed)
    model = build_resnet18(len(splits.classes))
    set_trainable(model, groups)
    stage = cfgmod.StageConfig(groups=groups, lr=0.01)
    opt = make_optimizer(model, stage, fused=runtime.fused_optimizer)
    sched = make_scheduler(opt, stage, 100)
    losses = []
    m = train_one_epoch(model, splits.train, Preprocess(32), runtime, opt, sched, groups, "eval",
                        8, True, torch.Generator().manual_seed(seed),
                        lambda i, loss, lr: losses.append(float(loss)), lambda: False)
    return m, losses, model


def test_default_cpu_runtime_is_close_to_fp32_and_deterministic(splits):
    torch.manual_seed(0)
    w0 = build_resnet18(len(splits.classes)).fc.weight.detach().clone()  # same init as below
    ref, ref_losses, ref_model = _train_epoch(Runtime(CPU), splits)
    fast, fast_losses, fast_model = _train_epoch(default_runtime(CPU), splits)
    again, again_losses, _ = _train_epoch(default_runtime(CPU), splits)
    assert fast_losses == again_losses  # same seed, same CPU runtime -> identical
    # bf16 perturbs activations by about 1 %: the first loss (same weights) is close, and
    # after a few steps the direction of the head's update still agrees (the benchmark
    # compares accuracy over real epochs).
    if default_runtime(CPU).autocast_dtype is None and default_runtime(CPU).frozen_dtype is None:
        # No reduced precision on this CPU: only summation order differs.
        assert fast_losses == pytest.approx(ref_losses, rel=1e-3)
    assert fast_losses[0] == pytest.approx(ref_losses[0], rel=0.05)
    assert sum(fast_losses) == pytest.approx(sum(ref_losses), rel=0.15)
    upd_ref, upd_fast = ref_model.fc.weight - w0, fast_model.fc.weight - w0
    assert F.cosine_similarity(upd_ref.flatten(), upd_fast.flatten(), dim=0) > 0.95
    assert ref.acc == pytest.approx(fast.acc, abs=0.2)


def test_default_runtime_follows_the_hardware():
    rt = default_runtime(CPU)
    assert isinstance(cpu_has_native_bf16(), bool)
    assert (rt.frozen_dtype == torch.bfloat16) == cpu_has_native_bf16()
    assert (rt.autocast_dtype == torch.bfloat16) == cpu_has_native_bf16()
    assert rt.eval_dtype is None  # evaluation in fp32: recorded accuracies reproduce exactly


def test_cpu_bf16_override_forces_either_runtime(monkeypatch):
    """$FINETUNE_LAB_CPU_BF16 emulates a CPU without bf16 (fp32 throughout) on one that has
    it, or forces bf16; anything else is refused rather than silently ignored."""
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert not cpu_has_native_bf16()
    rt = default_runtime(CPU)
    assert rt.autocast_dtype is None and rt.frozen_dtype is None and rt.eval_dtype is None
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert cpu_has_native_bf16()
    rt = default_runtime(CPU)
    assert rt.autocast_dtype == torch.bfloat16 and rt.frozen_dtype == torch.bfloat16
    monkeypatch.setenv(CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match=CPU_BF16_ENV):
        cpu_has_native_bf16()
    monkeypatch.setenv(CPU_BF16_ENV, "")
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def test_optimizer_fused_or_not_gives_the_same_update():
    torch.manual_seed(0)
    m1 = build_resnet18(3)
    m2 = copy.deepcopy(m1)
    stage = cfgmod.StageConfig(groups=("fc",), lr=0.1, weight_decay=1e-3)
    for m in (m1, m2):
        set_trainable(m, stage.groups)
    o1, o2 = make_optimizer(m1, stage), make_optimizer(m2, stage, fused=True)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(3):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    torch.testing.assert_close(m2.fc.weight, m1.fc.weight, rtol=1e-5, atol=1e-6)


def test_evaluate_is_the_same_in_either_memory_format(splits):
    m = _model_with_real_bn(classes=3)
    a = evaluate(m, splits.val, Preprocess(32), Runtime(CPU))
    b = evaluate(m, splits.val, Preprocess(32), Runtime(CPU, frozen_channels_last=True))
    assert a[0] == pytest.approx(b[0], rel=1e-4) and a[1] == b[1] and torch.equal(a[2], b[2])
    with torch.no_grad():
        m.eval()
        logits = m(Preprocess(32).normalize(splits.val.images))
    assert a[0] == pytest.approx(F.cross_entropy(logits, splits.val.labels).item(), rel=1e-4)


def test_evaluate_and_feature_cache_batch_by_the_runtime(splits):
    """The runtime's evaluation batch size (larger on CUDA) changes only the batching."""
    m = _model_with_real_bn(classes=3)
    whole = evaluate(m, splits.val, Preprocess(32), Runtime(CPU))
    small = Runtime(CPU, eval_batch_size=3)
    assert len(splits.val) > 3  # really several batches
    part = evaluate(m, splits.val, Preprocess(32), small)
    assert part[0] == pytest.approx(whole[0], rel=1e-4) and torch.equal(part[2], whole[2])
    f_whole = compute_features(m, splits.val, PREFIX3, Preprocess(32), Runtime(CPU))
    f_part = compute_features(m, splits.val, PREFIX3, Preprocess(32), small)
    torch.testing.assert_close(f_part, f_whole, rtol=1e-4, atol=1e-5)


def test_cuda_runtime_selection_without_a_gpu():
    """What default_runtime picks on CUDA, decided from the GPU's bf16 support alone."""
    gpu = torch.device("cuda")
    rt = cuda_runtime(gpu, bf16_supported=True)
    assert rt.device == gpu and rt.autocast_dtype == rt.frozen_dtype == rt.eval_dtype == torch.bfloat16
    assert rt.channels_last and rt.frozen_channels_last and rt.data_on_device and rt.fused_optimizer
    assert rt.eval_batch(32) > default_runtime(CPU).eval_batch(32)
    # Larger images: the batch shrinks with the area, never below the CPU's.
    assert rt.eval_batch(64) == rt.eval_batch(32) // 4
    assert rt.eval_batch(224) == default_runtime(CPU).eval_batch(224) == default_runtime(CPU).eval_batch(32)
    old = cuda_runtime(gpu, bf16_supported=False)  # e.g. a T4 or V100: fp32, no fp16 scaler
    assert old.autocast_dtype is None and old.frozen_dtype is None and old.eval_dtype is None
    assert default_runtime(CPU) == cpu_runtime(cpu_has_native_bf16())


def test_bn_train_policy_prefix_is_not_folded(splits):
    """With BN policy "train" the prefix's statistics must keep moving (no folded copy)."""
    torch.manual_seed(0)
    model = build_resnet18(3)
    before = model.layer3[0].bn1.running_mean.clone()
    set_trainable(model, ("layer4", "fc"))
    stage = cfgmod.StageConfig(groups=("layer4", "fc"), bn_policy="train")
    opt = make_optimizer(model, stage)
    train_one_epoch(model, splits.train, Preprocess(32), default_runtime(CPU), opt,
                    make_scheduler(opt, stage, 10), stage.groups, "train", 8, True,
                    torch.Generator().manual_seed(0), lambda *a: None, lambda: False)
    assert not torch.equal(before, model.layer3[0].bn1.running_mean)


# ---------------------------------------------------------------- speed estimate


def test_estimate_model_orders_stages_sensibly():
    s1 = model_epoch_seconds(("layer4", "fc"), 45_000)
    s2 = model_epoch_seconds(("layer3", "layer4", "fc"), 45_000)
    everything = model_epoch_seconds(cfgmod.LAYER_GROUPS, 45_000)
    assert 0 < s1 < s2 < everything
    assert model_epoch_seconds(("layer4", "fc"), 45_000, feature_cache=True) < s1
    assert model_epoch_seconds(("layer4", "fc"), 90_000) == pytest.approx(2 * s1)
    assert model_epoch_seconds(("layer4", "fc"), 45_000, resolution=64) == pytest.approx(4 * s1)


def test_estimate_uses_measured_speed_from_the_store(store):
    cfg = cfgmod.preset_config("Two-stage", resolution=32)
    run = store.create_run(cfg, name="measured")
    store.set_results(run.id, RunResults(device="cpu"))
    store.log_metrics(run.id, [(1, 1.0, 10, "images_per_s", 1000.0),
                               (1, 2.0, 20, "images_per_s", 1200.0),
                               (2, 3.0, 30, "images_per_s", 500.0)])
    assert measured_images_per_s(("layer4", "fc"), 32, False, store) == pytest.approx(1100.0)
    assert estimate_epoch_seconds(("fc", "layer4"), 11_000, 32, False, store=store) == pytest.approx(10.0)
    assert estimate_epoch_seconds(("layer3", "layer4", "fc"), 5_000, store=store) == pytest.approx(10.0)
    # Other resolution, feature-cache choice or device: no measurement -> the model.
    assert measured_images_per_s(("layer4", "fc"), 64, False, store) is None
    assert measured_images_per_s(("layer4", "fc"), 32, True, store) is None
    assert measured_images_per_s(("layer4", "fc"), 32, False, store, device="cuda") is None
    assert estimate_epoch_seconds(cfgmod.LAYER_GROUPS, 1000, store=store) == pytest.approx(
        model_epoch_seconds(cfgmod.LAYER_GROUPS, 1000))


def test_estimate_without_a_store_does_not_create_one(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_LAB_DATA", str(tmp_path / "nowhere"))
    assert estimate_epoch_seconds(("fc",), 1000) == pytest.approx(model_epoch_seconds(("fc",), 1000))
    assert not os.path.exists(tmp_path / "nowhere")


def test_evaluate_above_32_px_pools_like_the_model():
    """At 64 px layer4's map is 2x2, not 1x1: evaluation must average-pool it as the
    model does before fc (it used to feed fc the flattened map and fail)."""
    m = _model_with_real_bn(classes=3)
    pre = Preprocess(64)
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8, generator=g),
                    torch.tensor([0, 1, 2, 0, 1, 2]), ["a", "b", "c"])
    loss, _, pred = evaluate(m, data, pre, Runtime(CPU))
    with torch.no_grad():
        m.eval()
        logits = m(pre.normalize(data.images))
    assert loss == pytest.approx(F.cross_entropy(logits, data.labels).item(), rel=1e-4)
    assert torch.equal(pred, logits.argmax(1))

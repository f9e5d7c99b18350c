"""The one preprocessing definition and the data-set plumbing around it."""

import torch
from PIL import Image

from core.engine.data import ImageSet, Preprocess, cap_stratified, load_folder_tree, stratified_split


def test_preprocess_centre_crops_the_shorter_side():
    img = Image.new("RGB", (96, 32), (255, 0, 0))
    img.paste((0, 0, 255), (32, 0, 64, 32))  # blue centre third
    x = Preprocess(32).to_uint8(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    assert (x[2] > 200).float().mean() > 0.9 and (x[0] < 50).float().mean() > 0.9


def test_a_very_thin_strip_does_not_blow_up_memory():
    x = Preprocess(64).to_uint8(Image.new("L", (2_000_000, 1), 77))
    assert x.shape == (3, 64, 64) and int(x.float().mean()) == 77


def test_normalize_uses_imagenet_statistics():
    pre = Preprocess(32)
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    y = pre.normalize(x)
    expected = [(1 - m) / s for m, s in zip(pre.mean, pre.std)]
    assert torch.allclose(y[0, :, 0, 0], torch.tensor(expected), atol=1e-5)


def test_stratified_split_keeps_class_shares_and_is_seeded():
    labels = torch.tensor([0] * 80 + [1] * 20)
    rest, held = stratified_split(labels, 0.25, seed=3)
    assert sorted(labels[held].tolist()).count(0) == 20 and labels[held].tolist().count(1) == 5
    assert set(rest.tolist()).isdisjoint(held.tolist()) and len(rest) + len(held) == 100
    assert torch.equal(held, stratified_split(labels, 0.25, seed=3)[1])
    assert not torch.equal(held, stratified_split(labels, 0.25, seed=4)[1])


def test_cap_keeps_proportions():
    data = ImageSet(torch.zeros(100, 3, 2, 2, dtype=torch.uint8),
                    torch.tensor([0] * 50 + [1] * 50), ["a", "b"])
    capped = cap_stratified(data, 20, seed=0)
    assert capped.class_counts() == [10, 10]


def test_decoded_folder_is_cached_on_disk(tiny_folder, tmp_path):
    pre = Preprocess(32)
    first = load_folder_tree(tiny_folder / "train", pre, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("decoded-*.pt"))) == 1
    messages = []
    again = load_folder_tree(tiny_folder / "train", pre, cache_dir=tmp_path,
                             on_progress=lambda m, f: messages.append(m))
    assert torch.equal(first.images, again.images) and first.classes == again.classes
    assert any("from cache" in m for m in messages)

"""Data: sources (CIFAR-10 via torchvision, image folders), decoded once into uint8
tensors (cached on disk), stratified seeded splits, batched tensor augmentation, and THE
preprocessing definition shared by training, evaluation and the classify page.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps

from core.atomic import TEMP_PREFIX, TEMP_SUFFIX, left_by_dead_writer
from core.engine.checkpoints import atomic_torch_save
from core.engine.image_types import (  # shared with torch-free pages
    IMAGE_EXTENSIONS,  # noqa: F401 (re-exported: core.engine.data names the whole data rule)
    OUTSIDE_LINK,
    list_class_folders,
    list_image_files,
    train_test_folders,
)
from core.engine.paths import cifar10_dir

# ImageNet statistics: the pretrained backbone expects inputs normalised with these, and
# we keep them for random init too so every checkpoint is interchangeable.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Refuse images above this many pixels before decoding them (decompression bombs). Checked
# in open_image, where images are decoded: PIL's own global limit is left as it is.
MAX_IMAGE_PIXELS = 40_000_000
# A decoded data set must fit in memory with room to spare; above this we refuse with advice.
MAX_DECODED_BYTES = 6 * 1024**3

# Bump when Preprocess.to_uint8 changes its pixels: decoded-data caches are keyed on it.
PREPROCESS_VERSION = "2"

ProgressFn = Callable[[str, float], None]  # (message, fraction 0..1)


class DataError(ValueError):
    """A data set cannot be used; the message says why and what to do."""


class Cancelled(Exception):
    """Work stopped because cancellation was requested (while decoding, training,
    validating or testing)."""


StopFn = Callable[[], bool]  # asked now and then: True means stop (raise Cancelled)


# ---------------------------------------------------------------- preprocessing (the one)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes model input. Stored in every checkpoint.

    Geometry (PIL -> uint8): EXIF-orient, convert to RGB (alpha composited on white),
    resize the shorter side to `resolution`, centre-crop a square. Training adds its random
    crop/flip on these uint8 tensors; `normalize` then gives the float input.
    """

    resolution: int = 32
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_uint8(self, img: Image.Image) -> torch.Tensor:
        """A PIL image as a 3 x resolution x resolution uint8 tensor."""
        img = to_rgb(img)
        r = self.resolution
        w, h = img.size
        if (w, h) != (r, r):
            # Resize only the centred square (PIL's `box`): the same picture as "shorter side
            # to r, then centre-crop", without ever building the full-width intermediate (a
            # 40,000 x 1 pixel strip would otherwise become gigapixels).
            side = min(w, h)
            left, top = (w - side) / 2, (h - side) / 2
            img = img.resize((r, r), Image.Resampling.BILINEAR,
                             box=(left, top, left + side, top + side), reducing_gap=3.0)
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        return t.view(r, r, 3).permute(2, 0, 1).contiguous()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x H x W (any device) -> normalised float32."""
        mean, std = _channel_constants(self.mean, self.std, x.device)
        return (x.float() - mean) / std

    def to_dict(self) -> dict:
        return {"resolution": self.resolution, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        return cls(resolution=int(d["resolution"]), mean=tuple(d["mean"]), std=tuple(d["std"]))


@functools.lru_cache(maxsize=32)
def _channel_constants(mean: tuple[float, float, float], std: tuple[float, float, float],
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of 0..255 pixel values as 1 x 3 x 1 x 1 tensors on `device`, made once
    per device: a host-to-device copy per batch would wait for the GPU, and is not allowed
    inside a CUDA graph capture at all."""
    return ((torch.tensor(mean) * 255.0).view(1, 3, 1, 1).to(device),
            (torch.tensor(std) * 255.0).view(1, 3, 1, 1).to(device))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image (palette, alpha, grayscale, 16-bit, CMYK, animated) as RGB."""
    try:
        img.seek(0)  # first frame of an animation
    except (AttributeError, EOFError):
        pass
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping everything to white.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 0 else 1.0
        img = Image.fromarray((arr / hi * 255.0).astype("uint8"), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def open_image(path_or_file) -> Image.Image:
    """Open and fully decode an image, raising DataError with a plain reason on failure.
    The size is checked from the header, before decoding: above MAX_IMAGE_PIXELS nothing is
    decoded. A truncated file is an error, not a grey image (PIL's default, which we keep)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path_or_file)
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS:
                raise DataError(f"image is too large ({w}x{h} pixels; the limit is "
                                f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels)")
            img.load()
        return img
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"image is too large (the limit is {MAX_IMAGE_PIXELS // 1_000_000} megapixels)") from None
    except Image.UnidentifiedImageError:
        raise DataError("not an image file PIL can read (JPEG, PNG, GIF, WebP, BMP, TIFF)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"image file is damaged or truncated ({exc})") from None


# ---------------------------------------------------------------- in-memory data sets


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 N x 3 x R x R
    labels: torch.Tensor  # int64 N
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # "path: reason" for unreadable files

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.classes, [])

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()


@dataclass
class DataSplits:
    train: ImageSet
    val: ImageSet
    test: ImageSet
    classes: list[str]
    skipped: list[str]
    source: str  # human description


def _list_images(class_dir: Path) -> tuple[list[Path], list[str]]:
    files, others, outside = list_image_files(class_dir)
    return files, ([f"{p}: not an image file (skipped)" for p in others]
                   + [f"{p}: {OUTSIDE_LINK}" for p in outside])


def scan_folder(root: Path, classes: Sequence[str] = ()) -> tuple[list[str], list[list[Path]], list[str]]:
    """Class names, per-class image paths, and skipped files of one class-folder tree."""
    if not root.is_dir():
        raise DataError(f"folder {root} does not exist; check the path")
    class_dirs, outside = list_class_folders(root)
    if classes:
        names = {d.name for d in class_dirs}
        missing = [c for c in classes if c not in names]
        if missing:
            raise DataError(f"{root}: no folder for class(es) {', '.join(missing)}; "
                            f"found {', '.join(sorted(names)) or 'none'}")
        class_dirs = [d for d in class_dirs if d.name in classes]
    per_class, skipped = [], [f"{d}: {OUTSIDE_LINK}" for d in outside]
    for d in class_dirs:
        files, skip = _list_images(d)
        skipped += skip
        if not files:
            raise DataError(f"class folder {d} has no images; add images or remove the folder")
        per_class.append(files)
    if len(class_dirs) < 2:
        raise DataError(f"{root} has {len(class_dirs)} class folder(s); a classifier needs at "
                        f"least two (one sub-folder of images per class)")
    return [d.name for d in class_dirs], per_class, skipped


def check_same_classes(root: Path, train_classes: Sequence[str], test_classes: Sequence[str]) -> None:
    """Raise DataError when train/ and test/ do not hold the same class folders."""
    if list(train_classes) != list(test_classes):
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(
            f"train/ and test/ in {root} have different classes (only in train: "
            f"{', '.join(only_train) or '-'}; only in test: {', '.join(only_test) or '-'}); "
            f"give both the same class folders")


def _cache_key(parts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def decode_files(paths: Sequence[Path], labels: Sequence[int], pre: Preprocess,
                 on_progress: ProgressFn | None = None, what: str = "images",
                 should_stop: StopFn | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode image files into a uint8 N x 3 x R x R tensor; unreadable ones are skipped.
    `should_stop` is asked after every image; True stops the decoding (Cancelled)."""
    r = pre.resolution
    n = len(paths)
    if n * 3 * r * r > MAX_DECODED_BYTES:
        raise DataError(f"{n} images at {r}x{r} need {n * 3 * r * r / 1024**3:.1f} GiB in memory; "
                        f"lower the resolution or cap the number of training images")
    out = torch.empty((n, 3, r, r), dtype=torch.uint8)
    ok = torch.zeros(n, dtype=torch.bool)
    skipped: list[str] = []

    def work(i: int) -> str | None:
        try:
            out[i] = pre.to_uint8(open_image(paths[i]))
            ok[i] = True
            return None
        except DataError as exc:
            return f"{paths[i]}: {exc} (skipped)"

    # PIL releases the GIL while decoding, so threads use every core without the cost of
    # worker processes.
    # Small chunks: a cancel waits for at most the chunks already running.
    pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)
    try:
        step = max(1, n // 50)
        for i, err in enumerate(pool.map(work, range(n), chunksize=8)):
            if err:
                skipped.append(err)
            if should_stop is not None and should_stop():
                raise Cancelled()
            if on_progress and (i % step == 0 or i == n - 1):
                on_progress(f"Decoding {what}: {i + 1:,}/{n:,}", (i + 1) / n)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    label_t = torch.as_tensor(list(labels), dtype=torch.int64)
    return out[ok], label_t[ok], skipped


SelectFn = Callable[[torch.Tensor], torch.Tensor]  # labels -> sorted indices to keep


def load_folder_tree(root: Path, pre: Preprocess, classes: Sequence[str] = (),
                     cache_dir: Path | None = None, on_progress: ProgressFn | None = None,
                     should_stop: StopFn | None = None, select: SelectFn | None = None,
                     ) -> ImageSet:
    """One class-folder tree as an ImageSet, decoded once and cached on disk. With
    `select` (given every file's label, the sorted indices a run uses: a cap, a split) only
    those files are decoded."""
    names, per_class, skipped = scan_folder(root, classes)
    paths = [p for files in per_class for p in files]
    labels = [i for i, files in enumerate(per_class) for _ in files]
    if select is not None:
        keep = select(torch.as_tensor(labels, dtype=torch.int64)).tolist()
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    cache_file = None
    if cache_dir is not None:
        clean_dead_cache_temps(Path(cache_dir))
        stats = [f"{p}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in paths]
        key = _cache_key([PREPROCESS_VERSION, str(root.resolve()), str(pre.resolution), *names, *stats])
        cache_file = Path(cache_dir) / f"decoded-{key}.pt"
        if cache_file.exists():
            try:
                d = torch.load(cache_file, weights_only=True)
                if on_progress:
                    on_progress(f"Loaded decoded {root.name} images from cache", 1.0)
                return ImageSet(d["images"], d["labels"], list(d["classes"]), list(d["skipped"]))
            except Exception:  # stale/corrupt cache: rebuild it
                pass
    images, label_t, bad = decode_files(paths, labels, pre, on_progress, what=f"{root.name} images",
                                        should_stop=should_stop)
    skipped += bad
    for i, name in enumerate(names):
        if int((label_t == i).sum()) == 0:
            raise DataError(f"class folder {root / name} has no readable images")
    result = ImageSet(images, label_t, names, skipped)
    if cache_file is not None:
        try:
            atomic_torch_save({"images": images, "labels": label_t, "classes": names,
                               "skipped": skipped}, cache_file)
        except OSError:
            pass  # a cache is an optimisation; a full disk must not stop training
    return result


def clean_dead_cache_temps(cache_dir: Path) -> list[Path]:
    """Remove the decoded-image cache's temp files that a killed writer left (each is as big
    as the data set); a live writer's stay. Returns what was removed."""
    removed = []
    for tmp in cache_dir.glob(f"{TEMP_PREFIX}decoded-*{TEMP_SUFFIX}"):
        if left_by_dead_writer(tmp):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def load_cifar10(root: Path, train: bool, pre: Preprocess, classes: Sequence[str] = (),
                 download: bool = True, select: SelectFn | None = None,
                 on_progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                 ) -> ImageSet:
    """CIFAR-10 through torchvision (downloaded into `root` the first time). Only the
    chosen classes and the `select`ed images (see load_folder_tree) are resized when the
    resolution is not CIFAR's 32 px."""
    import torchvision

    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=train, download=download)
    except Exception as exc:  # URLError, socket errors, integrity errors
        raise DataError(
            f"CIFAR-10 is not in {root} and could not be downloaded ({exc}). On a machine "
            f"without internet, copy the 'cifar-10-batches-py' folder (or the "
            f"cifar-10-python.tar.gz archive) into {root}, or use an image-folder data set "
            f"(data source 'folder') with train/ and test/ class folders."
        ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # N x 3 x 32 x 32
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    data = select_classes(ImageSet(images, labels, list(ds.classes)), classes)
    if select is not None:
        data = data.subset(select(data.labels))
    if pre.resolution != 32:
        n = len(data)
        out = torch.empty((n, 3, pre.resolution, pre.resolution), dtype=torch.uint8)
        step = max(1, n // 50)
        for i in range(n):
            out[i] = pre.to_uint8(Image.fromarray(data.images[i].permute(1, 2, 0).numpy()))
            if should_stop is not None and i % 64 == 0 and should_stop():
                raise Cancelled()
            if on_progress and (i % step == 0 or i == n - 1):
                on_progress(f"Resizing CIFAR-10 images to {pre.resolution} px: {i + 1:,}/{n:,}",
                            (i + 1) / n)
        data = ImageSet(out, data.labels, data.classes, data.skipped)
    return data


def select_classes(data: ImageSet, classes: Sequence[str]) -> ImageSet:
    if not classes:
        return data
    missing = [c for c in classes if c not in data.classes]
    if missing:
        raise DataError(f"unknown class(es) {', '.join(missing)}; the data set has "
                        f"{', '.join(data.classes)}")
    old = [data.classes.index(c) for c in classes]
    keep = torch.isin(data.labels, torch.as_tensor(old))
    remap = torch.full((len(data.classes),), -1, dtype=torch.int64)
    remap[torch.as_tensor(old)] = torch.arange(len(old))
    return ImageSet(data.images[keep], remap[data.labels[keep]], list(classes), data.skipped)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (rest, held_out): about `fraction` of every class held out, seeded."""
    g = torch.Generator().manual_seed(seed)
    rest, held = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = max(1, round(len(idx) * fraction)) if len(idx) > 1 else 0
        held.append(idx[:k])
        rest.append(idx[k:])
    return torch.cat(rest).sort().values, torch.cat(held).sort().values


def cap_indices(labels: torch.Tensor, max_images: int, seed: int) -> torch.Tensor:
    """Sorted indices of about `max_images` of `labels` with class proportions preserved
    (all of them when there is no cap or it is not reached)."""
    if not max_images or len(labels) <= max_images:
        return torch.arange(len(labels))
    _, keep = stratified_split(labels, max_images / len(labels), seed)
    return keep


def cap_stratified(data: ImageSet, max_images: int, seed: int) -> ImageSet:
    """Keep about `max_images` images with class proportions preserved."""
    if not max_images or len(data) <= max_images:
        return data
    return data.subset(cap_indices(data.labels, max_images, seed))


def load_splits(source: str, data_path: str, pre: Preprocess, classes: Sequence[str] = (),
                val_fraction: float = 0.1, test_fraction: float = 0.2,
                max_train_images: int = 0, seed: int = 0, cache_dir: Path | None = None,
                on_progress: ProgressFn | None = None, should_stop: StopFn | None = None,
                ) -> DataSplits:
    """Load a data source into train/val/test ImageSets. Validation is carved from train
    (stratified, seeded); the test set is left untouched for the final evaluation. Only
    what the run uses is decoded: the chosen classes, and of the training images the
    `max_train_images` cap (chosen from the file list, before decoding)."""

    def capped(labels: torch.Tensor) -> torch.Tensor:
        return cap_indices(labels, max_train_images, seed)

    def capped_rest(labels: torch.Tensor) -> torch.Tensor:  # one folder: train part, capped
        rest, _ = stratified_split(labels, test_fraction, seed + 1)
        return rest[capped(labels[rest])]

    def held_out(labels: torch.Tensor) -> torch.Tensor:  # one folder: its test part
        return stratified_split(labels, test_fraction, seed + 1)[1]

    if source == "cifar10":
        root = cifar10_dir(data_path)
        if on_progress:
            on_progress("Loading CIFAR-10", 0.0)
        train_all = load_cifar10(root, True, pre, classes, select=capped,
                                 on_progress=on_progress, should_stop=should_stop)
        test = load_cifar10(root, False, pre, classes, on_progress=on_progress,
                            should_stop=should_stop)
        desc = f"CIFAR-10 ({root})"
    elif source == "folder":
        root = Path(data_path).expanduser()
        if not root.is_dir():
            raise DataError(f"data folder {root} does not exist; check the path")
        parts = train_test_folders(root)
        if parts:
            train_all = load_folder_tree(parts[0], pre, classes, cache_dir, on_progress, should_stop,
                                         select=capped)
            test = load_folder_tree(parts[1], pre, classes, cache_dir, on_progress, should_stop)
            check_same_classes(root, train_all.classes, test.classes)
            desc = f"image folder {root} (train/ + test/)"
        else:
            # The split is made on the file list, so each part decodes only its own files.
            train_all = load_folder_tree(root, pre, classes, cache_dir, on_progress, should_stop,
                                         select=capped_rest)
            test = load_folder_tree(root, pre, classes, cache_dir, on_progress, should_stop,
                                    select=held_out)
            desc = f"image folder {root} (split {1 - test_fraction:.0%}/{test_fraction:.0%} into train/test)"
    else:
        raise DataError(f"unknown data source {source!r}")
    skipped = list(dict.fromkeys(train_all.skipped + test.skipped))  # a shared folder's once
    rest, held = stratified_split(train_all.labels, val_fraction, seed)
    train, val = train_all.subset(rest), train_all.subset(held)
    if len(train) < 2 or len(val) < 1 or len(test) < 1:
        raise DataError(f"too few images: {len(train)} train, {len(val)} validation, {len(test)} "
                        f"test; add images or raise the training-image cap")
    return DataSplits(train, val, test, train_all.classes, skipped, desc)


# ---------------------------------------------------------------- batching and augmentation


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None,
                  pad: int | None = None, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding + horizontal flip, on a uint8 (or float) batch
    N x C x H x W at once: no per-image Python work. `pad` defaults to H/8 (4 at 32 px)."""
    pad = crop_pad(x.shape[-2]) if pad is None else pad
    return apply_crop_flip(x, draw_crop_flip(len(x), pad, generator, flip), pad)


def crop_pad(height: int) -> int:
    """The random crop's zero padding at `height` px: H/8 (4 at 32 px)."""
    return max(1, height // 8)


def draw_crop_flip(n: int, pad: int, generator: torch.Generator | None = None,
                   flip: bool = True) -> torch.Tensor:
    """The random numbers of one augmented batch of `n` images, drawn on the generator's
    device (CPU) in augment_batch's order: a 3 x n int64 tensor of (row offset, column
    offset, flip 0/1). Drawing an epoch's worth up front and copying it to the GPU once
    keeps the per-batch work free of host-to-device copies that wait for the GPU."""
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    do_flip = (torch.rand(n, generator=generator) < 0.5) if flip else torch.zeros(n, dtype=torch.bool)
    return torch.stack([oy, ox, do_flip.long()])


def apply_crop_flip(x: torch.Tensor, params: torch.Tensor, pad: int) -> torch.Tensor:
    """augment_batch with its random numbers given (`params` from draw_crop_flip, on any
    device; moved to x's). Only tensor ops on x's device: no host work, no sync, so it
    can run inside a CUDA graph."""
    n, c, h, w = x.shape
    dev = x.device
    params = params.to(dev, non_blocking=True)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = params[0][:, None] + torch.arange(h, device=dev)[None, :]  # n x h
    cols = params[1][:, None] + torch.arange(w, device=dev)[None, :]  # n x w
    cols = torch.where(params[2][:, None].bool(), cols.flip(1), cols)
    b = torch.arange(n, device=dev)[:, None, None, None]
    ch = torch.arange(c, device=dev)[None, :, None, None]
    return padded[b, ch, rows[:, None, :, None], cols[:, None, None, :]]


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None, shuffle: bool = True,
                  drop_last: bool = False) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    batches = list(order.split(batch_size))
    if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches = batches[:-1]
    return batches


def drops_single_last_batch(n: int, batch_size: int) -> bool:
    """Training drops a last batch of exactly one image: BatchNorm in train mode cannot
    normalise a single sample. The one place this rule lives."""
    return n > 1 and n % batch_size == 1


def training_batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """One shuffled training epoch's batches of indices."""
    return batch_indices(n, batch_size, generator, shuffle=True,
                         drop_last=drops_single_last_batch(n, batch_size))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one training epoch of `n` images (see training_batches)."""
    return max(1, math.ceil((n - drops_single_last_batch(n, batch_size)) / batch_size))

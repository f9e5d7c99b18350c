"""Torch-free rules about image data sets (pages import this at start-up): the file
extensions the app reads, how a folder of images is listed, and the train/ + test/ folder
layout. Training (core.engine.data), the data-set checks and the Classify gallery all use
these, so they agree on what an image is and where it lies."""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})


def list_image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) anywhere under `folder` (recursively), sorted. Hidden
    files (".DS_Store", "._photo.jpg") are neither."""
    images, others = [], []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            (images if p.suffix.lower() in IMAGE_EXTENSIONS else others).append(p)
    return images, others


def train_test_folders(root: Path) -> tuple[Path, Path] | None:
    """(train/, test/) when `root` holds both, else None (one class-folder tree to split)."""
    train, test = root / "train", root / "test"
    return (train, test) if train.is_dir() and test.is_dir() else None

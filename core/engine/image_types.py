"""Torch-free rules about image data sets (pages import this at start-up): the file
extensions the app reads, how a folder of images is listed, and the train/ + test/ folder
layout. Training (core.engine.data), the data-set checks and the Classify gallery all use
these, so they agree on what an image is and where it lies.

Symbolic links are followed only where core.engine.paths.link_allowed says (into the data
roots): a link inside a data set that leads outside them is listed as refused, never read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from core.engine.paths import data_roots, link_allowed

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
# How a refused link reads in the skipped-file lists of training and the data-set checks.
OUTSIDE_LINK = "a link to outside the data folders (not followed)"


class ImageFiles(NamedTuple):
    images: list[Path]  # image files, sorted
    others: list[Path]  # files that are not images, sorted
    outside: list[Path]  # symbolic links leading outside the data roots: not followed


def list_image_files(folder: Path) -> ImageFiles:
    """The files anywhere under `folder` (recursively), sorted. Hidden files (".DS_Store",
    "._photo.jpg") are in no list; linked folders are not descended into (no loops)."""
    roots = data_roots()
    images, others, outside = [], [], []
    pending = [folder]
    while pending:
        try:
            with os.scandir(pending.pop()) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                if not link_allowed(path, roots):
                    outside.append(path)
                    continue
                if entry.is_dir():
                    continue
            if entry.is_dir(follow_symlinks=False):
                pending.append(path)
            elif entry.is_file() and not entry.name.startswith("."):
                (images if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(path)
    return ImageFiles(sorted(images), sorted(others), sorted(outside))


def list_class_folders(root: Path) -> tuple[list[Path], list[Path]]:
    """(class folders, refused links) directly under `root`, sorted: visible folders, a
    linked one only when link_allowed."""
    roots = data_roots()
    folders, outside = [], []
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or not p.is_dir():
            continue
        (folders if link_allowed(p, roots) else outside).append(p)
    return folders, outside


def train_test_folders(root: Path) -> tuple[Path, Path] | None:
    """(train/, test/) when `root` holds both (links only into the data roots), else None
    (one class-folder tree to split)."""
    train, test = root / "train", root / "test"
    usable = all(p.is_dir() and link_allowed(p) for p in (train, test))
    return (train, test) if usable else None

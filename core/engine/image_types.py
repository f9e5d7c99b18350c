"""Torch-free facts about image data sets (pages import this at start-up): the file
extensions the app reads and the train/ + test/ folder layout. core.engine.data re-exports both."""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})


def train_test_folders(root: Path) -> tuple[Path, Path] | None:
    """(train/, test/) when `root` holds both, else None (one class-folder tree to split)."""
    train, test = root / "train", root / "test"
    return (train, test) if train.is_dir() and test.is_dir() else None

"""Confine paths typed into the UI to configured data roots (no reading arbitrary files).

Roots come from FINETUNE_LAB_DATA_ROOTS (os.pathsep-separated); by default the run store's
`datasets/` folder and the user's home. No torch import here.
"""

from __future__ import annotations

import os
from pathlib import Path

from core.settings import StoreLayout

DATA_ROOTS_ENV = "FINETUNE_LAB_DATA_ROOTS"


class PathNotAllowed(ValueError):
    """A user-typed path outside every allowed data root."""


def default_datasets_dir() -> Path:
    """The data sets folder inside the data directory: the first data root by default,
    where zips are imported and CIFAR-10 is downloaded (its name is StoreLayout's)."""
    return StoreLayout.default().datasets


def cifar10_dir(data_path: str = "") -> Path:
    """Where CIFAR-10 is read from (and downloaded to): a run's data_path if it names one,
    else `<datasets>/cifar10`."""
    return Path(data_path) if data_path else default_datasets_dir() / "cifar10"


def data_roots() -> list[Path]:
    raw = os.environ.get(DATA_ROOTS_ENV, "")
    roots = [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]
    if not roots:
        roots = [default_datasets_dir(), Path.home()]
    return [r.resolve() for r in roots]


def resolve_user_path(text: str, roots: list[Path] | None = None) -> Path:
    """The real path of `text` (symlinks and '..' resolved) if it lies under an allowed
    root; relative paths are taken relative to the first root. Raises PathNotAllowed."""
    roots = data_roots() if roots is None else [Path(r).resolve() for r in roots]
    text = text.strip()
    if not text:
        raise PathNotAllowed("no path given")
    p = Path(text).expanduser()
    if not p.is_absolute():
        p = roots[0] / p
    real = p.resolve()
    for root in roots:
        if real == root or root in real.parents:
            return real
    raise PathNotAllowed(
        f"{text} is outside the allowed data folders ({', '.join(str(r) for r in roots)}); "
        f"put the data under one of them, or add its folder to {DATA_ROOTS_ENV}")

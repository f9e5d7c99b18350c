"""Confine paths to configured data roots (no reading arbitrary files): paths typed into
the UI, and symbolic links met inside a data folder (a link to /etc or another user's files
is not followed). One rule, `within_roots`, for both.

Roots come from FINETUNE_LAB_DATA_ROOTS (os.pathsep-separated); by default the run store's
`datasets/` folder and the user's home. No torch import here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from core.settings import StoreLayout

DATA_ROOTS_ENV = "FINETUNE_LAB_DATA_ROOTS"


class PathNotAllowed(ValueError):
    """A user-typed path outside every allowed data root."""


def default_datasets_dir() -> Path:
    """The data sets folder inside the data directory: the first data root by default,
    where zips are imported and CIFAR-10 is downloaded (its name is StoreLayout's)."""
    return StoreLayout.default().datasets


# What torchvision's CIFAR-10 holds (planning sizes a run by these before it is downloaded).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR10_TRAIN_IMAGES_PER_CLASS = 5000
CIFAR10_TEST_IMAGES_PER_CLASS = 1000


def cifar10_train_images(classes: Sequence[str]) -> int:
    """CIFAR-10 training images of `classes` (empty: all ten)."""
    return CIFAR10_TRAIN_IMAGES_PER_CLASS * (len(classes) or len(CIFAR10_CLASSES))


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
    if within_roots(real, roots):
        return real
    raise PathNotAllowed(
        f"{text} is outside the allowed data folders ({', '.join(str(r) for r in roots)}); "
        f"put the data under one of them, or add its folder to {DATA_ROOTS_ENV}")


def within_roots(path: Path, roots: Sequence[Path] | None = None) -> bool:
    """Whether the real location of `path` (every symlink and '..' resolved) is an allowed
    root or lies under one. `roots` must be resolved (data_roots() gives them so)."""
    real = Path(path).resolve()
    return any(real == root or root in real.parents
               for root in (data_roots() if roots is None else roots))


def shown_outside_roots(source: str, data_path: str) -> str | None:
    """Why the pages may not show a run's images, or None when they may. The one rule for
    data that reaches a page: the command line may train on any folder its user can read,
    but the pages (Classify's examples, Run insights' images) show only files under the data
    roots, so a run started from the command line never puts other files in a browser.
    CIFAR-10 in its default place (no data_path) is the app's own download."""
    if source == "cifar10" and not data_path:
        return None
    root = Path(data_path).expanduser() if source == "folder" else cifar10_dir(data_path)
    if within_roots(root):
        return None
    return (f"The run's images ({root}) are outside the app's data folders, so they are not "
            f"shown here; add that folder to {DATA_ROOTS_ENV} to see them.")


def link_allowed(path: Path, roots: Sequence[Path] | None = None) -> bool:
    """Whether a path met while listing a data folder may be followed: it is no symbolic
    link, or the link leads (through every further link) to somewhere under a data root.
    Listing never descends through a link it has not checked, so checking each entry as it
    is met confines the whole walk."""
    return not path.is_symlink() or within_roots(path, roots)

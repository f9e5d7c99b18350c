"""Your own data: import a zip of class folders as a data set, validate a folder, list the
data sets under the data roots, and pick preview images per class.

A zip is untrusted input. Entries with absolute paths, `..` components or symlinks make the
whole zip rejected (a zip built that way is either broken or hostile); the number of files
and the bytes actually decompressed are capped (zip bombs lie in their headers, so the cap
is enforced while reading). The zip is unpacked into a hidden temp folder under the target
root and moved into place with one rename only once it validated, so a half-imported data
set never appears. No torch import at module load.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import stat
import uuid
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from core.engine.image_types import IMAGE_EXTENSIONS, train_test_folders
from core.engine.paths import data_roots

# core.engine.data (open_image, scan_folder, DataError) imports torch: it is imported inside the
# functions that read images, so pages importing this module load fast.

MAX_FILES = 200_000  # entries in one zip
MAX_TOTAL_BYTES = 4 * 1024**3  # decompressed bytes of one zip
MAX_FILE_BYTES = 64 * 1024**2  # decompressed bytes of one image file
JUNK_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}
JUNK_DIRS = {"__MACOSX"}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FEW_IMAGES = 20  # per class: below this a model learns little; we warn

ProgressFn = Callable[[str, float], None]


class ImportRejected(ValueError):
    """The zip or folder cannot be used as a data set; the message says why."""


@dataclass(frozen=True)
class Limits:
    max_files: int = MAX_FILES
    max_total_bytes: int = MAX_TOTAL_BYTES
    max_file_bytes: int = MAX_FILE_BYTES


@dataclass
class DatasetSummary:
    name: str
    path: Path
    layout: str  # "split": train/ + test/ class folders; "single": one class-folder tree
    classes: list[str]
    # Images per class per part: {"train": {...}, "test": {...}} or {"all": {...}}.
    counts: dict[str, dict[str, int]]
    non_images: list[str] = field(default_factory=list)  # skipped: not an image extension
    corrupt: list[str] = field(default_factory=list)  # "file: reason"; removed on import
    ignored: int = 0  # OS junk (__MACOSX, .DS_Store, hidden files)
    warnings: list[str] = field(default_factory=list)

    @property
    def total_images(self) -> int:
        return sum(n for part in self.counts.values() for n in part.values())

    def per_class_total(self) -> dict[str, int]:
        out = {c: 0 for c in self.classes}
        for part in self.counts.values():
            for c, n in part.items():
                out[c] = out.get(c, 0) + n
        return out


# ---------------------------------------------------------------- zip entries


def _entry_parts(info: zipfile.ZipInfo) -> tuple[str, ...]:
    """The safe path components of an entry, or ImportRejected for a dangerous one."""
    raw = info.filename
    name = raw.replace("\\", "/")  # zips made on Windows sometimes use backslashes
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise ImportRejected(f"the zip contains a symbolic link ({raw}); links are not "
                             f"allowed in an uploaded data set")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ImportRejected(f"the zip contains an absolute path ({raw}); zip the class "
                             f"folders themselves")
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if ".." in parts:
        raise ImportRejected(f"the zip contains a path that climbs out of its folder ({raw}); "
                             f"it was rejected for safety")
    if any("\0" in p for p in parts):
        raise ImportRejected(f"the zip contains an invalid file name ({raw!r})")
    return parts


def _is_junk(parts: Sequence[str]) -> bool:
    return any(p in JUNK_DIRS or p.startswith(".") for p in parts) or parts[-1] in JUNK_NAMES


def _strip_common_top(paths: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Drop one shared top folder (`mydata/cats/1.jpg` -> `cats/1.jpg`) when every image
    sits at least two folders deep under it, i.e. it cannot itself be a class folder."""
    if not paths:
        return paths
    top = paths[0][0]
    if all(len(p) >= 3 and p[0] == top for p in paths) and top.lower() not in ("train", "test"):
        return [p[1:] for p in paths]
    return paths


def validate_name(name: str) -> str:
    name = name.strip()
    if not NAME_RE.fullmatch(name):
        raise ImportRejected("data set name: use 1-64 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
    return name


def _copy_limited(src: IO[bytes], dst: IO[bytes], limit: int, budget: list[int], label: str) -> None:
    """Copy at most `limit` bytes and no more than what is left in `budget[0]`, counting
    the bytes really decompressed (headers can lie)."""
    written = 0
    while chunk := src.read(1 << 20):
        written += len(chunk)
        budget[0] -= len(chunk)
        if written > limit:
            raise ImportRejected(f"{label} is larger than {limit // 1024**2} MB uncompressed; "
                                 f"resize the images first")
        if budget[0] < 0:
            raise ImportRejected("the zip unpacks to more data than allowed (a possible zip "
                                 "bomb, or simply too big); split it or resize the images")
        dst.write(chunk)


def import_zip(source: str | os.PathLike[str] | IO[bytes], name: str, root: Path | None = None,
               limits: Limits = Limits(), on_progress: ProgressFn | None = None) -> DatasetSummary:
    """Unpack a zip of class folders into `<root>/<name>` (root: the first data root) and
    validate it. Raises ImportRejected (nothing is left behind) when it cannot be used."""
    name = validate_name(name)
    root = Path(root) if root is not None else data_roots()[0]
    root.mkdir(parents=True, exist_ok=True)
    dest = root / name
    if dest.exists():
        raise ImportRejected(f"a data set named {name} already exists in {root}; pick another name")
    try:
        zf = zipfile.ZipFile(source)
    except zipfile.BadZipFile:
        raise ImportRejected("the upload is not a valid zip file") from None
    except OSError as exc:
        raise ImportRejected(f"the zip cannot be read ({exc})") from None
    tmp = root / f".import-{name}-{uuid.uuid4().hex[:8]}"
    try:
        with zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            if len(infos) > limits.max_files:
                raise ImportRejected(f"the zip has {len(infos):,} files; the limit is "
                                     f"{limits.max_files:,}")
            if sum(i.file_size for i in infos) > limits.max_total_bytes:
                raise ImportRejected(f"the zip unpacks to more than "
                                     f"{limits.max_total_bytes / 1024**3:.1f} GB; split it or resize the images")
            images, non_images, ignored = [], [], 0
            for info in infos:
                parts = _entry_parts(info)  # checks every entry before writing anything
                if not parts:
                    continue
                if _is_junk(parts):
                    ignored += 1
                elif PurePosixPath(parts[-1]).suffix.lower() in IMAGE_EXTENSIONS:
                    images.append((parts, info))
                else:
                    non_images.append("/".join(parts))
            if not images:
                raise ImportRejected("the zip has no image files (JPEG, PNG, GIF, WebP, BMP, TIFF); "
                                     "it should hold one folder of images per class")
            stripped = _strip_common_top([p for p, _ in images])
            if any(len(p) < 2 for p in stripped):
                loose = next("/".join(p) for p in stripped if len(p) < 2)
                raise ImportRejected(f"images must sit in one folder per class, but {loose} is "
                                     f"not in a class folder")
            tmp.mkdir()
            budget = [limits.max_total_bytes]
            for n, (parts, (_, info)) in enumerate(zip(stripped, images)):
                target = tmp.joinpath(*parts)
                # Belt and braces: the components were checked, but never write outside tmp.
                if tmp.resolve() not in target.resolve().parents:
                    raise ImportRejected(f"unsafe path in the zip: {info.filename}")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    _copy_limited(src, dst, limits.max_file_bytes, budget, "/".join(parts))
                if on_progress and n % 50 == 0:
                    on_progress(f"Unpacking {n + 1:,}/{len(images):,}", 0.5 * (n + 1) / len(images))
        summary = summarize_folder(tmp, name=name, check_images=True, remove_corrupt=True,
                                   on_progress=(lambda m, f: on_progress(m, 0.5 + 0.5 * f))
                                   if on_progress else None)
        summary.non_images = non_images + summary.non_images
        summary.ignored += ignored
        os.replace(tmp, dest)
        summary.path = dest
        return summary
    except zipfile.BadZipFile as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ImportRejected(f"the zip is damaged ({exc})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- folders


def _parts_of(folder: Path) -> dict[str, Path]:
    parts = train_test_folders(folder)
    return {"train": parts[0], "test": parts[1]} if parts else {"all": folder}


def summarize_folder(folder: str | os.PathLike[str], name: str = "", check_images: bool = True,
                     max_check_per_class: int = 0, remove_corrupt: bool = False,
                     on_progress: ProgressFn | None = None) -> DatasetSummary:
    """Classes, image counts and unreadable files of a data-set folder (train/ + test/
    class folders, or one class-folder tree). `check_images` decodes every image (or
    `max_check_per_class` of each class, sampled, for big folders); `remove_corrupt`
    deletes the unreadable ones (only for our own imported copy)."""
    from core.engine.data import DataError, check_same_classes, open_image, scan_folder

    folder = Path(folder)
    parts = _parts_of(folder)
    counts: dict[str, dict[str, int]] = {}
    classes: list[str] | None = None
    non_images: list[str] = []
    corrupt: list[str] = []
    to_check: list[tuple[str, str, Path]] = []
    for part, path in parts.items():
        try:
            names, per_class, skipped = scan_folder(path)
        except DataError as exc:
            raise ImportRejected(str(exc)) from None
        if classes is None:
            classes = names
        else:
            try:
                check_same_classes(folder, classes, names)
            except DataError as exc:
                raise ImportRejected(str(exc)) from None
        non_images += [s.split(": not an image")[0] for s in skipped]
        counts[part] = {c: len(files) for c, files in zip(names, per_class)}
        for c, files in zip(names, per_class):
            chosen = files
            if max_check_per_class and len(files) > max_check_per_class:
                chosen = random.Random(0).sample(files, max_check_per_class)
            to_check += [(part, c, f) for f in chosen]
    assert classes is not None
    if check_images:
        step = max(1, len(to_check) // 50)
        for n, (part, c, f) in enumerate(to_check):
            try:
                open_image(f).close()
            except DataError as exc:
                corrupt.append(f"{f.relative_to(folder)}: {exc}")
                if remove_corrupt:
                    f.unlink()
                    counts[part][c] -= 1
            if on_progress and (n % step == 0 or n == len(to_check) - 1):
                on_progress(f"Checking images {n + 1:,}/{len(to_check):,}", (n + 1) / len(to_check))
    empty = [f"{part}/{c}" if part != "all" else c
             for part, cc in counts.items() for c, k in cc.items() if k == 0]
    if empty:
        raise ImportRejected(f"class folder(s) {', '.join(empty)} have no readable images")
    summary = DatasetSummary(name=name or folder.name, path=folder,
                             layout="split" if "train" in parts else "single",
                             classes=classes, counts=counts, non_images=non_images,
                             corrupt=corrupt)
    totals = summary.per_class_total()
    few = [c for c, k in totals.items() if k < FEW_IMAGES]
    if few:
        summary.warnings.append(f"few images in {', '.join(few)} (under {FEW_IMAGES}); a few "
                                f"hundred per class give a much more useful model")
    if totals and max(totals.values()) > 5 * max(1, min(totals.values())):
        summary.warnings.append("classes are very unbalanced (the largest has over 5x the "
                                "images of the smallest); accuracy will favour the big classes")
    if summary.layout == "single":
        summary.warnings.append("no train/ and test/ folders: a test split is carved out of "
                                "the images automatically (the run's test fraction)")
    if corrupt and remove_corrupt:
        summary.warnings.append(f"{len(corrupt)} unreadable file(s) were left out")
    return summary


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    path: Path
    root: Path


def _looks_like_dataset(folder: Path) -> bool:
    """Cheap check (no decoding, bounded listing): train/+test/, or 2+ sub-folders that
    each hold an image among their first entries."""
    if train_test_folders(folder):
        return True
    with_images = 0
    try:
        subdirs = [d for d in os.scandir(folder) if d.is_dir() and not d.name.startswith(".")][:200]
        for d in subdirs:
            with os.scandir(d.path) as it:
                for n, entry in enumerate(it):
                    if n > 50:
                        break
                    if Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                        with_images += 1
                        break
            if with_images >= 2:
                return True
    except OSError:
        return False
    return False


def list_datasets(roots: Sequence[Path] | None = None) -> list[DatasetInfo]:
    """Data-set folders directly under each data root, by name. A root that is itself a
    data set with train/ and test/ is listed as one data set (by its root): its halves are
    never offered, least of all test/ as training data."""
    out = []
    for root in (data_roots() if roots is None else [Path(r) for r in roots]):
        if train_test_folders(root):
            out.append(DatasetInfo(root.name, root, root))
            continue
        try:
            children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            continue
        for child in children[:500]:
            if _looks_like_dataset(child):
                out.append(DatasetInfo(child.name, child, root))
    return out


def preview_samples(folder: str | os.PathLike[str], per_class: int = 6,
                    seed: int = 0) -> dict[str, list[Path]]:
    """A few image paths per class (from train/ when the folder is split), seeded so the
    grid does not reshuffle on every page rerun."""
    from core.engine.data import DataError, scan_folder

    folder = Path(folder)
    part = _parts_of(folder).get("train", folder)
    try:
        names, per_class_files, _ = scan_folder(part)
    except DataError as exc:
        raise ImportRejected(str(exc)) from None
    rng = random.Random(seed)
    return {c: sorted(rng.sample(files, min(per_class, len(files))))
            for c, files in zip(names, per_class_files)}

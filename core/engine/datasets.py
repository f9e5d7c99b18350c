"""Your own data: import a zip of class folders as a data set, validate a folder, list the
data sets under the data roots, and pick preview images per class.

A zip is untrusted input. Entries with absolute paths, `..` components, symlinks, names
over 255 bytes, encryption, or a file and a folder of one name make the whole zip rejected
(a zip built that way is either broken or hostile). Before anything is written, the sizes
its directory declares are checked per file, in all, against the free disk space and by
compression ratio (a zip bomb); while unpacking, the bytes really decompressed are counted
and stop at each entry's declared size (headers can lie). Every failure is an
ImportRejected with a plain message: no traceback, no server path. The zip is unpacked into a hidden temp folder under the target
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
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from core.atomic import left_by_dead_writer, writer_tag
from core.engine.image_types import IMAGE_EXTENSIONS, OUTSIDE_LINK, train_test_folders
from core.engine.paths import data_roots, link_allowed

# core.engine.data (open_image, scan_folder, DataError) imports torch: it is imported inside the
# functions that read images, so pages importing this module load fast.

MAX_FILES = 200_000  # entries in one zip
MAX_TOTAL_BYTES = 4 * 1024**3  # decompressed bytes of one zip
MAX_FILE_BYTES = 64 * 1024**2  # decompressed bytes of one image file
# Images are compressed already (JPEG, PNG, WebP) and barely shrink in a zip; even raw BMP or
# TIFF photos shrink a few times. An entry (or a whole zip) that would grow more than this
# many times is a zip bomb. Entries under RATIO_MIN_BYTES (decompressed) are too small to
# matter, and tiny flat images legitimately compress well.
MAX_RATIO = 100
RATIO_MIN_BYTES = 1024**2
# Bytes an import leaves free on the disk it unpacks to (room for the runs that use it).
KEEP_FREE_BYTES = 256 * 1024**2
MAX_NAME_BYTES = 255  # one file or folder name, as most file systems allow
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
    max_ratio: float = MAX_RATIO
    keep_free_bytes: int = KEEP_FREE_BYTES


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
    outside_links: list[str] = field(default_factory=list)  # links out of the data roots: not followed
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


_READABLE_COMPRESSION = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


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
    long = next((p for p in parts if len(p.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES), None)
    if long is not None:
        raise ImportRejected(f"the zip holds a name longer than {MAX_NAME_BYTES} bytes "
                             f"({long[:40]}…); shorten it and zip the folders again")
    if info.flag_bits & 0x1:
        raise ImportRejected(f"the zip is password-protected ({raw} is encrypted); unzip it "
                             f"and zip the folders again without a password")
    if info.compress_type not in _READABLE_COMPRESSION:
        raise ImportRejected(f"the zip uses a compression method this app cannot read (for "
                             f"{raw}); zip the folders again with the usual (deflate) method")
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


def _mb(n: int) -> str:
    return f"{n / 1024**2:,.1f} MB"


def _check_layout(paths: list[tuple[str, ...]]) -> None:
    """Refuse paths that cannot all be written: one twice, or a file where another entry
    needs a folder of the same name."""
    files, folders = set(), set()
    for p in paths:
        if p in files:
            raise ImportRejected(f"the zip holds {'/'.join(p)} twice; keep one and zip it again")
        files.add(p)
        folders.update(p[:i] for i in range(1, len(p)))
    clash = files & folders
    if clash:
        raise ImportRejected(f"the zip holds both a file and a folder named "
                             f"{'/'.join(min(clash))}; rename one and zip it again")


def _check_sizes(images: list[zipfile.ZipInfo], root: Path, limits: Limits) -> int:
    """Refuse, from the zip's directory and before anything is written, a zip that would
    unpack too big: per file, in all, against the free disk space, or by compression ratio
    (a zip bomb). Returns the bytes the images may unpack to (what the unpacking loop
    counts against: headers can lie)."""
    for info in images:
        if info.file_size > limits.max_file_bytes:
            raise ImportRejected(f"{info.filename} is larger than {limits.max_file_bytes // 1024**2} MB "
                                 f"uncompressed; resize the images first")
        if info.file_size >= RATIO_MIN_BYTES and info.file_size > limits.max_ratio * max(1, info.compress_size):
            raise ImportRejected(
                f"{info.filename} would unpack from {_mb(info.compress_size)} to {_mb(info.file_size)} "
                f"({info.file_size / max(1, info.compress_size):,.0f} times bigger); images do not "
                f"shrink like that, so this looks like a zip bomb and nothing was unpacked")
    total = sum(i.file_size for i in images)
    packed = sum(i.compress_size for i in images)
    if total >= RATIO_MIN_BYTES and total > limits.max_ratio * max(1, packed):
        raise ImportRejected(f"the zip would unpack from {_mb(packed)} to {_mb(total)} "
                             f"({total / max(1, packed):,.0f} times bigger); images do not shrink "
                             f"like that, so this looks like a zip bomb and nothing was unpacked")
    if total > limits.max_total_bytes:
        raise ImportRejected(f"the zip unpacks to more than {limits.max_total_bytes / 1024**3:.1f} GB; "
                             f"split it or resize the images")
    room = shutil.disk_usage(root).free - limits.keep_free_bytes
    if total > room:
        raise ImportRejected(f"the zip unpacks to {_mb(total)} but the disk has room for "
                             f"{_mb(max(0, room))} (keeping {_mb(limits.keep_free_bytes)} free); "
                             f"free some space or import a smaller zip")
    return total


def _copy_checked(src: IO[bytes], dst: IO[bytes], declared: int, budget: list[int], label: str) -> None:
    """Copy one entry, counting the bytes really decompressed: more than its header
    declared (asked for one byte past it, so a lie shows) or more than the zip's remaining
    budget stops the import."""
    written = 0
    while chunk := src.read(min(1 << 20, declared - written + 1)):
        written += len(chunk)
        budget[0] -= len(chunk)
        if written > declared or budget[0] < 0:
            raise ImportRejected(f"{label} holds more data than the zip's header says "
                                 f"({declared:,} bytes): the zip is damaged or built to mislead "
                                 f"(a zip bomb); nothing was imported")
        dst.write(chunk)


def _unpack_error(exc: BaseException, label: str) -> ImportRejected:
    """A plain message (no server paths, no traceback) for an entry that failed to unpack."""
    if isinstance(exc, zipfile.BadZipFile) and "CRC" in str(exc):
        return ImportRejected(f"{label} does not match the zip's checksum or header (the zip is "
                              f"damaged, or lies about its sizes); nothing was imported")
    if isinstance(exc, (zipfile.BadZipFile, zlib.error, EOFError)):
        return ImportRejected(f"the zip is damaged: {label} cannot be decompressed; make the "
                              f"zip again")
    if isinstance(exc, OSError):
        return ImportRejected(f"{label} could not be written ({exc.strerror or type(exc).__name__}); "
                              f"nothing was imported")
    return ImportRejected(f"{label} could not be unpacked ({type(exc).__name__}); nothing was imported")


def import_zip(source: str | os.PathLike[str] | IO[bytes], name: str, root: Path | None = None,
               limits: Limits = Limits(), on_progress: ProgressFn | None = None) -> DatasetSummary:
    """Unpack a zip of class folders into `<root>/<name>` (root: the first data root) and
    validate it. Raises ImportRejected (nothing is left behind) when it cannot be used:
    every entry's name, encryption, sizes and compression ratio are checked before the
    first byte is written, and the bytes really decompressed are counted while writing."""
    name = validate_name(name)
    root = Path(root) if root is not None else data_roots()[0]
    root.mkdir(parents=True, exist_ok=True)
    dest = root / name
    if dest.exists():
        raise ImportRejected(f"a data set named {name} already exists in {root}; pick another name")
    clean_dead_imports(root)
    zf = _open_zip(source)
    tmp = root / f"{IMPORT_PREFIX}{name}-{writer_tag()}-{uuid.uuid4().hex[:8]}"
    try:
        with zf:
            images, non_images, ignored = _sort_entries(zf, limits)
            paths = _class_paths([p for p, _ in images])
            budget = [_check_sizes([info for _, info in images], root, limits)]
            tmp.mkdir()
            _unpack(zf, [(p, info) for p, (_, info) in zip(paths, images)], tmp, budget,
                    on_progress)
        try:
            summary = summarize_folder(tmp, name=name, check_images=True, remove_corrupt=True,
                                       on_progress=(lambda m, f: on_progress(m, 0.5 + 0.5 * f))
                                       if on_progress else None)
        except ImportRejected as exc:  # it names the hidden temp folder: name the upload
            raise ImportRejected(str(exc).replace(str(tmp), zip_label(source))) from None
        summary.non_images = non_images + summary.non_images
        summary.ignored += ignored
        os.replace(tmp, dest)
        summary.path = dest
        return summary
    except zipfile.BadZipFile as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _unpack_error(exc, "an entry") from None
    except OSError as exc:  # e.g. the disk filled while checking, or the final rename
        shutil.rmtree(tmp, ignore_errors=True)
        raise ImportRejected(f"the data set could not be saved ({exc.strerror or type(exc).__name__})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


IMPORT_PREFIX = ".import-"  # the hidden folder a zip is unpacked into before it is renamed


def clean_dead_imports(root: Path) -> list[Path]:
    """Remove the unpack folders that an import killed part-way left under data root `root`
    (a live import's folder stays). Returns what was removed."""
    removed = []
    for folder in root.glob(f"{IMPORT_PREFIX}*"):
        if folder.is_dir() and left_by_dead_writer(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def zip_label(source: str | os.PathLike[str] | IO[bytes]) -> str:
    """How messages name the zip: the uploaded or given file's name, never a temp path."""
    name = getattr(source, "name", None) if not isinstance(source, (str, os.PathLike)) else source
    return f"the zip {Path(name).name}" if name else "the zip"


def _open_zip(source: str | os.PathLike[str] | IO[bytes]) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError):
        raise ImportRejected("the upload is not a valid zip file") from None
    except OSError as exc:
        raise ImportRejected(f"the zip cannot be read ({exc.strerror or type(exc).__name__})") from None


_ZipImage = tuple[tuple[str, ...], zipfile.ZipInfo]  # an image entry: its path components, its header


def _sort_entries(zf: zipfile.ZipFile, limits: Limits) -> tuple[list[_ZipImage], list[str], int]:
    """(image entries, paths of the other files, how many OS junk files) of the zip; every
    entry's name is checked here, before anything is written."""
    infos = [i for i in zf.infolist() if not i.is_dir()]
    if len(infos) > limits.max_files:
        raise ImportRejected(f"the zip has {len(infos):,} files; the limit is "
                             f"{limits.max_files:,}")
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
    return images, non_images, ignored


def _class_paths(image_paths: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The images' paths without a folder they all share, checked to be class folders."""
    stripped = _strip_common_top(image_paths)
    if any(len(p) < 2 for p in stripped):
        loose = next("/".join(p) for p in stripped if len(p) < 2)
        raise ImportRejected(f"images must sit in one folder per class, but {loose} is "
                             f"not in a class folder")
    _check_layout(stripped)
    return stripped


def _unpack(zf: zipfile.ZipFile, entries: list[_ZipImage], tmp: Path, budget: list[int],
            on_progress: ProgressFn | None) -> None:
    """Write each entry to its path under `tmp`, counting the bytes against `budget`."""
    for n, (parts, info) in enumerate(entries):
        label = "/".join(parts)
        target = tmp.joinpath(*parts)
        # Belt and braces: the components were checked, but never write outside tmp.
        if tmp.resolve() not in target.resolve().parents:
            raise ImportRejected(f"unsafe path in the zip: {info.filename}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                _copy_checked(src, dst, info.file_size, budget, label)
        except ImportRejected:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError,
                NotImplementedError) as exc:
            raise _unpack_error(exc, label) from None
        if on_progress and n % 50 == 0:
            on_progress(f"Unpacking {n + 1:,}/{len(entries):,}", 0.5 * (n + 1) / len(entries))


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
    folder = Path(folder)
    parts = _parts_of(folder)
    scan = _scan_parts(folder, parts, max_check_per_class)
    corrupt = _decode_check(folder, scan, remove_corrupt, on_progress) if check_images else []
    empty = [f"{part}/{c}" if part != "all" else c
             for part, cc in scan.counts.items() for c, k in cc.items() if k == 0]
    if empty:
        raise ImportRejected(f"class folder(s) {', '.join(empty)} have no readable images")
    summary = DatasetSummary(name=name or folder.name, path=folder,
                             layout="split" if "train" in parts else "single",
                             classes=scan.classes, counts=scan.counts, non_images=scan.non_images,
                             corrupt=corrupt, outside_links=scan.outside_links)
    summary.warnings += _summary_warnings(summary, remove_corrupt)
    return summary


@dataclass
class _FolderScan:
    """What listing a data-set folder's parts found, before any image is decoded."""

    classes: list[str]
    counts: dict[str, dict[str, int]]  # images per class per part (DatasetSummary.counts)
    non_images: list[str]
    outside_links: list[str]
    to_check: list[tuple[str, str, Path]]  # (part, class, file) of the images to decode


def _scan_parts(folder: Path, parts: dict[str, Path], max_check_per_class: int) -> _FolderScan:
    """Lists every part's class folders (the same classes in each) and picks the images to
    decode: all of them, or `max_check_per_class` of each class, sampled."""
    from core.engine.data import DataError, check_same_classes, scan_folder

    counts: dict[str, dict[str, int]] = {}
    classes: list[str] | None = None
    non_images: list[str] = []
    outside_links: list[str] = []
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
        for s in skipped:
            if s.endswith(OUTSIDE_LINK):
                outside_links.append(s[: -len(OUTSIDE_LINK) - 2])
            else:
                non_images.append(s.split(": not an image")[0])
        counts[part] = {c: len(files) for c, files in zip(names, per_class)}
        for c, files in zip(names, per_class):
            chosen = files
            if max_check_per_class and len(files) > max_check_per_class:
                chosen = random.Random(0).sample(files, max_check_per_class)
            to_check += [(part, c, f) for f in chosen]
    assert classes is not None
    return _FolderScan(classes, counts, non_images, outside_links, to_check)


def _decode_check(folder: Path, scan: _FolderScan, remove_corrupt: bool,
                  on_progress: ProgressFn | None) -> list[str]:
    """Decodes `scan.to_check`; returns the unreadable ones as "file: reason". With
    `remove_corrupt` they are deleted and no longer counted in `scan.counts`."""
    from core.engine.data import DataError, open_image

    corrupt: list[str] = []
    to_check = scan.to_check
    step = max(1, len(to_check) // 50)
    for n, (part, c, f) in enumerate(to_check):
        try:
            open_image(f).close()
        except DataError as exc:
            corrupt.append(f"{f.relative_to(folder)}: {exc}")
            if remove_corrupt:
                f.unlink()
                scan.counts[part][c] -= 1
        if on_progress and (n % step == 0 or n == len(to_check) - 1):
            on_progress(f"Checking images {n + 1:,}/{len(to_check):,}", (n + 1) / len(to_check))
    return corrupt


def _summary_warnings(summary: DatasetSummary, remove_corrupt: bool) -> list[str]:
    """What may make a data set train badly, or was left out of it, in words."""
    out = []
    totals = summary.per_class_total()
    few = [c for c, k in totals.items() if k < FEW_IMAGES]
    if few:
        out.append(f"few images in {', '.join(few)} (under {FEW_IMAGES}); a few "
                   f"hundred per class give a much more useful model")
    if totals and max(totals.values()) > 5 * max(1, min(totals.values())):
        out.append("classes are very unbalanced (the largest has over 5x the "
                   "images of the smallest); accuracy will favour the big classes")
    if summary.layout == "single":
        out.append("no train/ and test/ folders: a test split is carved out of "
                   "the images automatically (the run's test fraction)")
    if summary.outside_links:
        out.append(f"{len(summary.outside_links)} link(s) lead outside the data folders and "
                   f"were not followed; copy those images in instead")
    if summary.corrupt and remove_corrupt:
        out.append(f"{len(summary.corrupt)} unreadable file(s) were left out")
    return out


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
        subdirs = [d for d in os.scandir(folder) if d.is_dir() and not d.name.startswith(".")
                   and link_allowed(Path(d.path))][:200]
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
    """Data-set folders directly under each data root, by name (a linked one only when the
    link stays inside the data roots). A root that is itself a data set with train/ and
    test/ is listed as one data set (by its root): its halves are never offered, least of
    all test/ as training data."""
    out = []
    roots = data_roots() if roots is None else [Path(r).resolve() for r in roots]
    for root in roots:
        if train_test_folders(root):
            out.append(DatasetInfo(root.name, root, root))
            continue
        try:
            children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                              and link_allowed(p, roots))
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

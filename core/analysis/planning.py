"""What a run config will do before it runs: split sizes, class count, trainable parameters
and time per stage, the seeds of a repeat, and every problem with it. Pure arithmetic on
typed inputs, so the New run page only draws widgets and renders a `RunPlan`.

No torch import here (pages import this at start-up); scanning a folder imports the data
module only when called.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core import config as cfgmod
from core.config import LAYER_GROUPS, RunConfig, training_images
from core.engine.image_types import train_test_folders
from core.engine.model_info import resnet18_parameters
from core.engine.paths import (
    CIFAR10_CLASSES,
    CIFAR10_TEST_IMAGES_PER_CLASS,
    cifar10_train_images,
)
from core.runs.disk import memory_problem

CIFAR10_FOLDER = "cifar-10-batches-py"  # what torchvision's CIFAR10 reads (and downloads)


def cifar10_present(data_path: str = "") -> bool:
    """Whether CIFAR-10 is already where a run would read it, so no download is needed."""
    from core.engine.paths import cifar10_dir

    return (cifar10_dir(data_path) / CIFAR10_FOLDER).is_dir()


def needs_download(cfg: RunConfig) -> tuple[str, ...]:
    """What a run of `cfg` would download when it starts, which fails on a machine without
    internet: "imagenet" (the starting weights), "cifar10" (the data set). New run and
    Experiments say so before anything is queued, with the fixes that work offline."""
    from core.engine.model_info import imagenet_weights_path  # a path: no torch import

    needed = []
    if cfg.weights == "imagenet" and not imagenet_weights_path().exists():
        needed.append("imagenet")
    if cfg.data_source == "cifar10" and not cifar10_present(cfg.data_path):
        needed.append("cifar10")
    return tuple(needed)


# Seconds per epoch for (groups, images, resolution in pixels, feature cache, device or None
# for any): core.analysis.speed.estimate_epoch_seconds with a store bound.
EpochEstimate = Callable[..., float]


@dataclass(frozen=True)
class FolderScan:
    """An image folder as the form sees it: its classes, the training images per class
    (the train/ part when it has train/ and test/), and why it could not be read."""

    classes: tuple[str, ...] = ()
    train_images: dict[str, int] = field(default_factory=dict)
    has_test_split: bool = False
    error: str = ""

    @property
    def total_train_images(self) -> int:
        return sum(self.train_images.values())


def scan_image_folder(root: Path) -> FolderScan:
    """Classes and images per class of a data folder (reads the disk, imports torch)."""
    from core.engine.data import DataError, scan_folder

    parts = train_test_folders(root)
    split = parts is not None
    try:
        classes, per_class, _ = scan_folder(parts[0] if parts else root)
    except DataError as exc:
        return FolderScan(has_test_split=split, error=str(exc))
    except OSError as exc:
        return FolderScan(has_test_split=split, error=f"cannot read {root}: {exc.strerror}")
    return FolderScan(tuple(classes), {c: len(f) for c, f in zip(classes, per_class)}, split)


def class_options(data_source: str, scan: FolderScan | None) -> tuple[str, ...]:
    """The classes a run on this data can pick from."""
    if data_source == "cifar10":
        return CIFAR10_CLASSES
    return scan.classes if scan else ()


@dataclass(frozen=True)
class StagePlan:
    trains: str  # "layer4+fc", or "nothing"
    trainable_parameters: int
    total_parameters: int
    epochs: int
    lr: float
    epoch_seconds: float | None  # None: nothing to estimate from (no images or no groups)

    @property
    def stage_seconds(self) -> float | None:
        return None if self.epoch_seconds is None else self.epoch_seconds * self.epochs


@dataclass(frozen=True)
class RunPlan:
    num_classes: int
    train_images: int  # after the cap and the validation split
    val_images: int
    test_images: int | None  # None: a folder's test/ part, which the form does not scan
    stages: tuple[StagePlan, ...]
    errors: tuple[str, ...]  # path problems first, then config problems
    seeds: tuple[int, ...]  # one run per seed
    cautions: tuple[str, ...] = ()  # may not work (e.g. memory), said but not refused


def collect_errors(cfg: RunConfig, path_errors: Sequence[str]) -> tuple[str, ...]:
    """Path problems, then the config's. A refused path was left blank in `cfg`, so the
    config's own "needs a path" error for it would only repeat the problem."""
    errors = cfgmod.validate(cfg)
    if path_errors:
        errors = [e for e in errors if not e.startswith(("data_path", "weights_path"))]
    return (*path_errors, *errors)


def plan_run(cfg: RunConfig, scan: FolderScan | None, path_errors: Sequence[str],
             repeats: int, epoch_seconds: EpochEstimate,
             available_memory: int | None = None) -> RunPlan:
    """The plan of `cfg` (and `repeats` runs with seeds seed, seed+1, ...). `scan`: the data
    folder of a folder run (None when there is none yet); `path_errors`: paths the form
    refused; `available_memory`: bytes this machine can give a run now, to size feature
    caches against (None: not checked)."""
    errors = list(path_errors)
    if scan is not None and scan.error:
        errors.append(f"data folder: {scan.error}")
    scan_classes = scan.classes if scan is not None and not scan.error else ()
    if cfg.data_source == "cifar10":
        num_classes = len(cfg.classes) or len(CIFAR10_CLASSES)
        pool, n_train, _ = training_images(cfg, cifar10_train_images(cfg.classes), True)
        test: int | None = CIFAR10_TEST_IMAGES_PER_CLASS * num_classes
    else:
        num_classes = len(cfg.classes) or len(scan_classes) or len(CIFAR10_CLASSES)
        counts = scan.train_images if scan is not None else {}
        found = sum(counts[c] for c in (cfg.classes or scan_classes) if c in counts)
        pool, n_train, test = training_images(cfg, found,
                                              scan is not None and scan.has_test_split)

    total = resnet18_parameters(LAYER_GROUPS, num_classes)
    # Measured speeds from earlier runs on the same kind of device count; "auto" uses any.
    device = None if cfg.device == "auto" else cfg.device
    stages = tuple(
        StagePlan(trains=s.trains or "nothing",
                  trainable_parameters=resnet18_parameters(s.groups, num_classes),
                  total_parameters=total, epochs=s.epochs, lr=s.lr,
                  epoch_seconds=(epoch_seconds(tuple(s.groups), n_train, cfg.resolution,
                                               s.feature_cache, device)
                                 if n_train and s.groups else None))
        for s in cfg.stages)
    cautions: list[str] = []
    if available_memory is not None:
        problem, caution = memory_problem(cfg, n_train, available_memory)  # the submit's check
        errors += [f"memory: {problem}"] if problem else []
        cautions += [caution] if caution else []
    return RunPlan(num_classes=num_classes, train_images=n_train, val_images=pool - n_train,
                   test_images=test, stages=stages, errors=collect_errors(cfg, errors),
                   seeds=tuple(cfg.seed + k for k in range(repeats)), cautions=tuple(cautions))

"""Checks made when a run is started, so a bad data set or weights choice fails at once
with a clear message, not minutes later inside the worker.

Cheap: folders are listed, not decoded (corrupt files are found and counted while decoding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.config import ConfigError, RunConfig


class PreflightError(ConfigError):
    """The config is valid but its data or weights cannot be used. A ConfigError, so every
    caller that shows config errors shows these too."""


@dataclass
class PreflightReport:
    classes: list[str] = field(default_factory=list)
    train_images: int = 0  # image files found (before the cap and the validation split)
    skipped_files: int = 0  # non-image files that will be ignored
    notes: list[str] = field(default_factory=list)


def preflight(cfg: RunConfig, store=None) -> PreflightReport:
    """Raise PreflightError naming every problem; return what was found otherwise."""
    from core.engine.data import DataError, check_same_classes, scan_folder, train_test_folders

    report = PreflightReport()
    errors: list[str] = []
    if cfg.data_source == "folder":
        root = Path(cfg.data_path).expanduser()
        try:
            if not root.is_dir():
                raise DataError(f"data folder {root} does not exist; check the path")
            parts = train_test_folders(root)
            if parts:
                names, files, skipped = scan_folder(parts[0], cfg.classes)
                test_names, _, test_skipped = scan_folder(parts[1], cfg.classes)
                check_same_classes(root, names, test_names)
                skipped += test_skipped
            else:
                names, files, skipped = scan_folder(root, cfg.classes)
            report.classes = names
            report.train_images = sum(len(f) for f in files)
            report.skipped_files = len(skipped)
            if skipped:
                report.notes.append(f"{len(skipped)} non-image file(s) will be skipped")
        except DataError as exc:
            errors.append(f"data: {exc}")
    if cfg.weights == "file" and not Path(cfg.weights_path).expanduser().is_file():
        errors.append(f"weights_path: {cfg.weights_path} does not exist")
    if cfg.weights == "run" and store is not None:
        other = store.get_run(cfg.weights_run)
        if other is None:
            errors.append(f"weights_run: no run {cfg.weights_run!r}")
        elif not other.best_checkpoint or not Path(other.best_checkpoint).is_file():
            errors.append(f"weights_run: run {cfg.weights_run} has no best checkpoint yet; "
                          f"pick a finished run")
    if cfg.weights == "imagenet":
        from core.engine.model_info import imagenet_weights_path  # no torch needed for a path

        if not imagenet_weights_path().exists():
            report.notes.append("ImageNet weights are not cached yet: they will be downloaded "
                                "when the run starts (offline, pick random, file or run weights)")
    from core.runs.disk import space_problem  # the worker helper's figures (12.2)
    from core.runs.files import data_dir

    if problem := space_problem(cfg, report.train_images, store.root if store else data_dir()):
        errors.append(f"disk: {problem}")
    if errors:
        raise PreflightError(errors)
    return report

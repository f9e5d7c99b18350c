"""Checks made when a run is started, so a bad data set or weights choice fails at once
with a clear message, not minutes later inside the worker.

Cheap: folders are listed, not decoded (corrupt files are found and counted while decoding).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from core.config import ConfigError, RunConfig, training_images
from core.engine.paths import cifar10_train_images

if TYPE_CHECKING:
    from core.runs.store import RunStore


class PreflightError(ConfigError):
    """The config is valid but its data or weights cannot be used. A ConfigError, so every
    caller that shows config errors shows these too."""


class ExecutorUnavailable(PreflightError):
    """The config is fine but where it would run cannot take it now (the Ray cluster is
    unreachable, or has no node with the resources the run asks for). Shown as "cannot
    submit", not as a config problem."""


@dataclass
class PreflightReport:
    classes: list[str] = field(default_factory=list)
    train_images: int = 0  # image files found (before the cap and the validation split)
    skipped_files: int = 0  # non-image files that will be ignored
    notes: list[str] = field(default_factory=list)
    memory_bytes: int = 0  # what the worker is expected to hold at most (memory_estimate)


def available_memory() -> int:
    """Bytes of memory this machine can give a new process now (psutil: free plus
    reclaimable caches). On a cluster the worker's node may have more or less."""
    import psutil

    return psutil.virtual_memory().available


def input_paths(cfg: RunConfig) -> list[Path]:
    """The files and folders a run reads besides the store: an image-folder data set and a
    weights file."""
    paths = []
    if cfg.data_source == "folder" and cfg.data_path:
        paths.append(Path(cfg.data_path).expanduser())
    if cfg.weights == "file" and cfg.weights_path:
        paths.append(Path(cfg.weights_path).expanduser())
    return paths


def donor_checkpoint(store: RunStore, cfg: RunConfig) -> str | None:
    """The best checkpoint of the run whose weights start this one (weights "run")."""
    other = store.get_run(cfg.weights_run) if cfg.weights == "run" else None
    return other.best_checkpoint if other is not None and other.best_checkpoint else None


def preflight(cfg: RunConfig, store=None) -> PreflightReport:
    """Raise PreflightError naming every problem; return what was found otherwise."""
    from core.engine.data import DataError, check_same_classes, scan_folder, train_test_folders

    report = PreflightReport()
    errors: list[str] = []
    has_test_split = cfg.data_source == "cifar10"  # a folder's: its train/ + test/ layout
    if cfg.data_source == "folder":
        root = Path(cfg.data_path).expanduser()
        try:
            if not root.is_dir():
                raise DataError(f"data folder {root} does not exist; check the path")
            parts = train_test_folders(root)
            has_test_split = bool(parts)
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
    if cfg.weights == "file":
        problem = weights_file_problem(Path(cfg.weights_path).expanduser())
        if problem:
            errors.append(f"weights_path: {cfg.weights_path} {problem}")
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
    from core.runs.disk import memory_problem, space_problem  # the worker helper's figures (12.2)
    from core.settings import data_dir

    if problem := space_problem(cfg, report.train_images, store.root if store else data_dir()):
        errors.append(f"disk: {problem}")
    found = (report.train_images if cfg.data_source == "folder"
             else cifar10_train_images(cfg.classes))
    report.memory_bytes = memory_estimate(cfg, found, has_test_split)
    _, cached, _ = training_images(cfg, found, has_test_split)
    problem, caution = memory_problem(cfg, cached, available_memory())
    if problem:
        errors.append(f"memory: {problem}")
    if caution:
        report.notes.append(caution)
    if errors:
        raise PreflightError(errors)
    return report


# ---------------------------------------------------------------- memory and device

# A training worker's memory besides its images and feature cache: the interpreter, torch,
# ResNet-18 with its gradients and optimizer state, and a batch's activations (bytes).
# Measured peak RSS (GNU time, `core train`, 2-core AMD EPYC, 27 training images, 1 thread):
# 0.98 GiB at 32 px, batch 4; 1.10 GiB at 224 px, batch 32 (stage 1 trains layer4+fc). All
# layers trainable at 224 px with a full batch hold far more activations: the 3 GiB above
# 64 px is an allowance for that, not a measurement.
WORKER_BASE_BYTES = 5 * 1024**3 // 4
WORKER_BASE_BYTES_224 = 3 * 1024**3


def memory_estimate(cfg: RunConfig, found: int, has_test_split: bool) -> int:
    """Bytes the run's worker will hold at most: its base, the decoded images it keeps
    (uint8, 3 x resolution^2 each: training, validation and test) and the largest stage's
    feature cache (the upper figure of core.runs.disk). What a cluster job reserves."""
    from core.runs.disk import feature_cache_bytes

    pool, cached, test = training_images(cfg, found, has_test_split)
    images = pool + (test or 0)
    caches = feature_cache_bytes(cfg, cached)
    base = WORKER_BASE_BYTES if cfg.resolution <= 64 else WORKER_BASE_BYTES_224
    return base + images * 3 * cfg.resolution ** 2 + max((most for _, _, most in caches),
                                                          default=0)


def run_memory_estimate(cfg: RunConfig) -> int:
    """memory_estimate for a config alone (the folder is listed again: cheap)."""
    from core.engine.data import DataError, scan_folder, train_test_folders

    if cfg.data_source != "folder":
        return memory_estimate(cfg, cifar10_train_images(cfg.classes), True)
    root = Path(cfg.data_path).expanduser()
    try:
        parts = train_test_folders(root)
        _, files, _ = scan_folder(parts[0] if parts else root, cfg.classes)
    except (DataError, OSError):
        return memory_estimate(cfg, 0, True)  # the worker will say what is wrong
    return memory_estimate(cfg, sum(len(f) for f in files), bool(parts))


def machine_devices() -> list[str]:
    """The devices this machine can train on, in words ("cpu (2 cores)", "cuda (1 x NVIDIA
    H100)", "mps")."""
    import torch

    from core.process import physical_cores

    have = [f"cpu ({physical_cores()} cores)"]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        have.append(f"cuda ({len(names)} x {names[0]})")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        have.append("mps")
    return have


def device_problem(cfg: RunConfig) -> str | None:
    """Why `cfg.device` cannot be used on this machine (issue 22.8), or None. 'auto' and
    'cpu' always can."""
    if cfg.device not in ("cuda", "mps"):
        return None
    have = machine_devices()
    if any(h.split()[0] == cfg.device for h in have):
        return None
    return (f"device: {cfg.device} was chosen but this machine has no "
            f"{'CUDA GPU' if cfg.device == 'cuda' else 'Apple MPS'}; it has "
            f"{', '.join(have)}. Pick auto or cpu, or run it where there is one")


# ---------------------------------------------------------------- the weights file

EXPECTED_WEIGHTS = ("expected a ResNet-18 state dict (a dict of tensors saved with "
                    "torch.save(model.state_dict(), path)) or a checkpoint of this app")
# Blocks per layer group and block kind -> the torchvision ResNet that has them.
_RESNETS = {((2, 2, 2, 2), False): "ResNet-18", ((3, 4, 6, 3), False): "ResNet-34",
            ((3, 4, 6, 3), True): "ResNet-50", ((3, 4, 23, 3), True): "ResNet-101",
            ((3, 8, 36, 3), True): "ResNet-152"}


def _sniff(head: bytes) -> str | None:
    """What a file that torch cannot load is, from its first bytes, in words."""
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        return "a JSON file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive that is not a PyTorch file"
    if head.startswith(b"\x80"):
        return "a Python pickle that is not a PyTorch weights file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the sample
            return None
    return "a text file"


def _architecture(state: dict) -> str | None:
    """The torchvision ResNet whose layer structure `state`'s tensor names have, if any."""
    blocks = {}
    for key in state:
        m = re.match(r"layer([1-4])\.(\d+)\.", key)
        if m:
            blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
    shape = tuple(blocks.get(i, 0) for i in range(1, 5))
    bottleneck = any(".conv3." in k for k in state)
    return _RESNETS.get((shape, bottleneck))


def weights_file_problem(path: Path) -> str | None:
    """Why `path` cannot start a run ("is a JSON file; expected ..."), or None when it holds
    ResNet-18 weights. Opened with torch.load(weights_only=True): nothing in the file runs.
    torch's own message is never passed on (it suggests weights_only=False, which would
    run whatever code the file holds)."""
    if not path.is_file():
        return "does not exist; check the path"
    import pickle

    import torch

    from core.engine.checkpoints import ARCH, FORMAT

    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not head:
        return f"is empty; {EXPECTED_WEIGHTS}"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # A torch file or pickle holding objects other than tensors (a whole model, an
        # optimizer, arbitrary classes): refused unopened, as loading it could run code.
        what = _sniff(head) or "a binary file"
        if head.startswith((b"PK\x03\x04", b"\x80")):
            what = ("a pickle of Python objects, not only tensors (for example a whole model "
                    "saved with torch.save(model)); it was not opened, since loading it "
                    "could run code")
        return f"is {what}; {EXPECTED_WEIGHTS}"
    except Exception:  # damaged or foreign files: torch's messages vary by version
        return f"is {_sniff(head) or 'not a PyTorch file (or a damaged one)'}; {EXPECTED_WEIGHTS}"
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if obj.get("arch") != ARCH:
            return f"is a checkpoint for {obj.get('arch')!r}, not {ARCH}; {EXPECTED_WEIGHTS}"
        obj = obj.get("state_dict")
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__
        return f"holds a {kind} that is not a state dict (tensor names to tensors); {EXPECTED_WEIGHTS}"
    arch = _architecture(obj)
    if arch is None:
        example = next(iter(obj))
        return (f"holds tensors that are not a ResNet's (e.g. {example!r}); {EXPECTED_WEIGHTS}")
    if arch != "ResNet-18":
        return f"holds {arch} weights; {EXPECTED_WEIGHTS}"
    from core.engine.model import build_resnet18

    own = build_resnet18(2).state_dict()
    wrong = [k for k, v in own.items() if not k.startswith("fc.")
             and (k not in obj or tuple(obj[k].shape) != tuple(v.shape))]
    if wrong:
        return (f"has ResNet-18's tensor names but {len(wrong)} backbone tensors are missing or "
                f"of another shape (e.g. {wrong[0]}); {EXPECTED_WEIGHTS}")
    # NaN or infinite weights train to a NaN loss from the first batch: refused here, at
    # submit, not found out as a diverged run.
    broken = [k for k, v in obj.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        return (f"holds non-finite values (NaN or infinity) in {len(broken)} tensor(s) "
                f"(e.g. {broken[0]}); these weights cannot train: save them again from a sound model")
    return None

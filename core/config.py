"""Run and stage configuration: frozen dataclasses, validation with field-named errors,
presets, and a dict/JSON round-trip that rejects unknown keys and wrong types.

The one config schema: each field's `FieldSpec` (label, help, widget kind, bounds, choices,
command-line flag) sits in the field's metadata. The command line's options
(core.cli) and the New run form's session-state keys and widgets (`form_state`,
`from_form`) are derived from it.

No torch import here: pages import this at start-up and must load fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

# ResNet-18's layer groups, input side first. `conv1` includes `bn1`.
LAYER_GROUPS: tuple[str, ...] = ("conv1", "layer1", "layer2", "layer3", "layer4", "fc")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "step", "onecycle")
# What BatchNorm layers inside *frozen* groups do while training:
# "eval"  -> running statistics stay fixed (the right default: requires_grad=False alone
#            still lets them drift in train() mode, silently changing a "frozen" layer);
# "train" -> they keep updating their running mean/var from the new data.
BN_POLICIES: tuple[str, ...] = ("eval", "train")
DATA_SOURCES: tuple[str, ...] = ("cifar10", "folder")
WEIGHT_SOURCES: tuple[str, ...] = ("imagenet", "random", "file", "run")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "mps")

MAX_STAGES = 4
MIN_RESOLUTION, MAX_RESOLUTION = 32, 224
# Learning rates the form offers, on a log scale: 1, 2, 3, 5 per decade from 1e-5 to 1. A
# config's exact LR is always offered too (a preset's lr/3 is not on the grid).
LR_GRID: tuple[float, ...] = tuple(round(m * 10.0 ** e, 10) for e in range(-5, 0)
                                   for m in (1, 2, 3, 5)) + (1.0,)
BATCH_SIZES: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)
# A preset's knobs: epochs per stage and the learning rate its stages scale.
PRESET_EPOCHS = 1
PRESET_LR = 0.01
# "Fast transfer" trains its cached stage at this many times the preset LR: on the
# time-to-accuracy benchmark (benchmarks/README.md) 5x reached the best accuracy of the
# rates tried, and the preset LR itself ended 2-4 points lower.
FAST_TRANSFER_LR_MULT = 5.0
# The largest seed: torch.Generator.manual_seed takes 64-bit seeds, and a run adds small
# offsets to its seed (seed + 1 for the test split), so the bound is the signed 64-bit one.
MAX_SEED = 2**63 - 1
# How deeply a config file may nest: a real config is 3 levels deep; the bound keeps a
# hostile file from exhausting the parser's recursion.
MAX_JSON_DEPTH = 32


class ConfigError(ValueError):
    """One or more configuration problems, each naming its field."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("; ".join(self.errors))


# ---------------------------------------------------------------- text users give runs

# Length limits, in characters, of the text users attach to runs, groups and experiments:
# every entry point (the pages, the command line, the store) checks these, and the pages'
# fields stop typing at them. Names and tags are labels (a 1 MB run name froze Compare's
# renderer); a note is a few paragraphs.
NAME_MAX_CHARS = 200  # a run, seed-group or experiment name
NOTE_MAX_CHARS = 10_000  # a run's or experiment's note
TAG_MAX_CHARS = 50  # one tag
TAGS_MAX = 30  # tags on one run or experiment


def text_limit_errors(name: str = "", group: str = "", note: str = "",
                      tags: Sequence[str] = ()) -> list[str]:
    """What is too long in the text given to a run or experiment, each message with its limit."""
    errors = []
    for what, value in (("name", name), ("group", group)):
        if len(value) > NAME_MAX_CHARS:
            errors.append(f"{what}: {len(value):,} characters; at most {NAME_MAX_CHARS} allowed")
    if len(note) > NOTE_MAX_CHARS:
        errors.append(f"note: {len(note):,} characters; at most {NOTE_MAX_CHARS:,} allowed")
    long_tags = [t for t in tags if len(t.strip()) > TAG_MAX_CHARS]
    if long_tags:
        errors.append(f"tags: {len(long_tags)} tag(s) over {TAG_MAX_CHARS} characters (one has "
                      f"{len(long_tags[0].strip()):,}); at most {TAG_MAX_CHARS} allowed")
    if len(tags) > TAGS_MAX:
        errors.append(f"tags: {len(tags)} tags; at most {TAGS_MAX} allowed")
    return errors


def check_text_limits(name: str = "", group: str = "", note: str = "",
                      tags: Sequence[str] = ()) -> None:
    """Raises ConfigError naming each text over its limit (text_limit_errors)."""
    if errors := text_limit_errors(name, group, note, tags):
        raise ConfigError(errors)


# ---------------------------------------------------------------- the schema

# Widget kinds of the New run form ("" = not on the form).
WIDGETS = ("", "number", "slider", "select_slider", "select", "radio", "checkbox", "text",
           "multiselect", "toggles")


@dataclass(frozen=True)
class FieldSpec:
    """How one config field is typed in: the one source of the command line's flags and the
    New run form's widgets and session-state keys. Bounds are the form's (validation below
    may allow more)."""

    label: str  # widget label
    help: str = ""  # widget tooltip and command-line help
    widget: str = ""  # one of WIDGETS
    choices: tuple[Any, ...] = ()  # the allowed values, in display order
    suggested: tuple[Any, ...] = ()  # a grid the form offers; other values are allowed too
    choice_labels: tuple[tuple[Any, str], ...] = ()  # display names of some choices
    low: int | float | None = None  # the type of the field: an int field has int bounds
    high: int | float | None = None
    step: int | float | None = None
    number_format: str | None = None  # printf-style, for number inputs
    flag: bool = False  # a `python -m core train --field-name` option

    def choice_label(self, value: Any) -> str:
        return dict(self.choice_labels).get(value, f"{value:g}" if isinstance(value, float)
                                            else str(value))

    def options(self, current: Any) -> tuple[Any, ...]:
        """The choices, or the suggested grid plus `current` if it is not on it: a value is
        never rounded to the nearest grid point."""
        if self.choices or current in self.suggested:
            return self.choices or self.suggested
        return tuple(sorted((*self.suggested, current)))


def _spec(default: Any, **spec: Any) -> Any:
    """A dataclass field with this default, described by FieldSpec(**spec)."""
    return field(default=default, metadata={"spec": FieldSpec(**spec)})


def specs(cls: type) -> list[tuple[dataclasses.Field, FieldSpec]]:
    """The fields of a config dataclass that carry a FieldSpec, in declaration order."""
    return [(f, f.metadata["spec"]) for f in fields(cls) if "spec" in f.metadata]


def field_spec(cls: type, name: str) -> FieldSpec:
    return next(spec for f, spec in specs(cls) if f.name == name)


@dataclass(frozen=True)
class StageConfig:
    # Layer groups trained in this stage; every other group is frozen.
    groups: tuple[str, ...] = _spec(
        ("layer4", "fc"), label="Layer groups", widget="toggles", choices=LAYER_GROUPS,
        help="layer groups that train in this stage; the rest stay frozen")
    epochs: int = _spec(1, label="Epochs", widget="number", low=1, high=1000, step=1)
    # SGD with momentum 0.9 (no Nesterov), or AdamW
    optimizer: str = _spec("sgd", label="Optimizer", widget="select", choices=OPTIMIZERS,
                           choice_labels=(("sgd", "SGD + momentum"), ("adamw", "AdamW")))
    lr: float = _spec(0.01, label="Learning rate", widget="select_slider", suggested=LR_GRID)
    # Per-group LR multiplier: a group k steps further from `fc` (input side) trains at
    # lr * group_lr_mult**k. 1.0 = one LR for all; 0.5 halves it per step deeper in.
    group_lr_mult: float = _spec(
        1.0, label="Per-group LR multiplier", widget="slider", low=0.1, high=1.0, step=0.05,
        help="Each group one step further from the head trains at lr × this. 1 = one "
             "learning rate for all.")
    weight_decay: float = _spec(5e-4, label="Weight decay", widget="number", low=0.0, high=1.0,
                                step=1e-4, number_format="%.5f")
    schedule: str = _spec("cosine", label="Schedule", widget="select", choices=SCHEDULES,
                          choice_labels=(("constant", "constant"), ("cosine", "cosine decay"),
                                         ("step", "step decay"), ("onecycle", "one-cycle")))
    # linear warm-up from 0 over this many epochs (fractions ok)
    warmup_epochs: float = _spec(0.0, label="Warm-up (epochs)", widget="number", low=0.0,
                                 high=100.0, step=0.5)
    bn_policy: str = _spec(
        "eval", label="Frozen BatchNorm", widget="select", choices=BN_POLICIES,
        choice_labels=(("eval", "eval (fixed stats)"), ("train", "train (stats drift)")),
        help="What BatchNorm layers in frozen groups do. 'eval' keeps their running "
             "statistics fixed; with 'train' they keep updating even though their weights "
             "are frozen.")
    # Train on cached outputs of the frozen prefix (computed once, without augmentation
    # through the frozen part). Much faster when only a suffix trains; see core.engine.train.
    # On the command line the flag turns it on for every stage.
    feature_cache: bool = _spec(
        False, label="Feature cache", widget="checkbox", flag=True,
        help="Compute the frozen layers' outputs once and train on them: much faster when "
             "only the last groups train; no augmentation then.")
    # End the stage early when validation accuracy has not beaten the stage's best for this
    # many epochs (0 = off: the stage runs all its epochs, which are then a cap). On the
    # command line the flag applies to every stage.
    plateau_patience: int = _spec(
        0, label="Plateau patience (epochs)", widget="number", low=0, high=999, step=1,
        flag=True,
        help="End the stage when validation accuracy has not improved for this many epochs; "
             "its epochs become a cap. 0 = off.")

    @property
    def trains(self) -> str:
        return "+".join(self.groups)


@dataclass(frozen=True)
class RunConfig:
    stages: tuple[StageConfig, ...] = field(default_factory=lambda: preset_stages("Two-stage"))
    # Data. "cifar10": torchvision's CIFAR-10 (downloaded into data_path, or the default
    # data root); "folder": an image folder with train/ and test/ class folders, or one
    # class-folder tree that is split into train/test.
    data_source: str = _spec(
        "cifar10", label="Data source", widget="radio", choices=DATA_SOURCES, flag=True,
        choice_labels=(("cifar10", "CIFAR-10 (torchvision)"), ("folder", "Image folder")),
        help="cifar10 (torchvision, downloads) or folder (an image folder)")
    data_path: str = _spec(
        "", label="Data folder", widget="text", flag=True,
        help="image folder (train/ and test/ class folders, or one class-folder tree), or "
             "where CIFAR-10 is downloaded")
    classes: tuple[str, ...] = _spec(  # empty = all classes of the data set
        (), label="Classes (none = all)", widget="multiselect", flag=True,
        help="subset of classes (default: all)")
    val_fraction: float = _spec(  # carved from train, stratified and seeded
        0.1, label="Validation fraction", widget="slider", low=0.05, high=0.5, step=0.05,
        flag=True, help="Share of the training images held out to pick the best epoch. The "
                        "test set is used once, at the end.")
    # only for a single class-folder tree without train/test
    test_fraction: float = _spec(0.2, label="Test fraction")
    max_train_images: int = _spec(  # 0 = all; a cap for quick demos (taken before the split)
        0, label="Training-image cap (0 = all)", widget="number", low=0, step=100, flag=True,
        help="Train on a stratified sample: quick demos. 0 = all.")
    resolution: int = _spec(  # square input side in pixels
        32, label="Resolution (pixels)", widget="number", low=MIN_RESOLUTION,
        high=MAX_RESOLUTION, step=16, flag=True,
        help=f"square input side in pixels, {MIN_RESOLUTION}..{MAX_RESOLUTION}")
    batch_size: int = _spec(128, label="Batch size", widget="select_slider",
                            suggested=BATCH_SIZES, flag=True, help="images per training step")
    augment: bool = _spec(  # random crop (padding 1/8 of the side) + horizontal flip
        True, label="Augmentation (crop + flip)", widget="checkbox", flag=True,
        help="random crop and horizontal flip of the training images")
    seed: int = _spec(0, label="Seed", widget="number", low=0, step=1, flag=True,
                      help=f"random seed, 0..{MAX_SEED}")
    weights: str = _spec(
        "imagenet", label="Starting weights", widget="radio", choices=WEIGHT_SOURCES, flag=True,
        choice_labels=(("imagenet", "ImageNet"), ("random", "Random (from scratch)"),
                       ("file", "Weights file"), ("run", "Another run's best checkpoint")),
        help="starting weights: imagenet, random, file (--weights-path), run (--weights-run)")
    weights_path: str = _spec(  # weights == "file": a state_dict or checkpoint file
        "", label="Weights file (.pth)", widget="text", flag=True,
        help="weights file, with --weights file")
    weights_run: str = _spec(  # weights == "run": the run id whose best checkpoint starts us
        "", label="Start from run", widget="select", flag=True,
        help="run id whose best checkpoint starts training, with --weights run")
    device: str = _spec(  # auto: cuda, then mps, then cpu
        "auto", label="Device", widget="select", choices=DEVICES, flag=True,
        choice_labels=(("auto", "auto (GPU if any)"), ("cpu", "CPU"), ("cuda", "CUDA GPU"),
                       ("mps", "Apple MPS")),
        help="auto: cuda, then mps, then cpu")
    # Stop the whole run (the remaining stages too) when validation accuracy has not beaten
    # the run's best for this many epochs, counted across stage boundaries. 0 = off.
    early_stop_patience: int = _spec(
        0, label="Early stop patience (epochs)", widget="number", low=0, high=999, step=1,
        flag=True,
        help="Stop the run when validation accuracy has not improved on the run's best for "
             "this many epochs, across stages. 0 = off.")
    threads: int = _spec(0, label="CPU threads", flag=True,
                         help="torch intra-op threads, 0 = automatic: at each stage's start, one per "
                              "physical core that other work leaves free")

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)


def training_images(cfg: RunConfig, found: int, has_test_split: bool
                    ) -> tuple[int, int, int | None]:
    """(images split into training and validation, of which training, test images or None
    when the data set has its own test split) from the `found` images of a run's training
    source: without a test split the test share comes off first, then the cap, then the
    validation share."""
    pool = int(found * (1 if has_test_split else 1 - cfg.test_fraction))
    test = None if has_test_split else found - pool
    if cfg.max_train_images:
        pool = min(pool, cfg.max_train_images)
    return pool, int(pool * (1 - cfg.val_fraction)), test


# ---------------------------------------------------------------- frozen prefix


def frozen_prefix(trainable: Sequence[str]) -> list[str]:
    """Groups before the first trainable one (input side): these need no autograd."""
    prefix = []
    for g in LAYER_GROUPS[:-1]:  # fc is never part of the feature extractor prefix
        if g in trainable:
            break
        prefix.append(g)
    return prefix


def cached_prefix(stage: StageConfig) -> list[str]:
    """The groups whose outputs a stage trains on from the feature cache: its frozen
    prefix, when the stage asks for the cache and the prefix's BatchNorm statistics are
    fixed (with bn_policy "train" they change every batch, so outputs cannot be cached).
    Empty when the stage caches nothing."""
    prefix = frozen_prefix(stage.groups)
    return prefix if stage.feature_cache and stage.bn_policy != "train" else []


# ---------------------------------------------------------------- presets

PRESET_DESCRIPTIONS: dict[str, str] = {
    "Two-stage": "Stage 1 trains the new head and layer4; stage 2 also unfreezes layer3 "
    "at a tenth of the learning rate with a cosine schedule (the recipe).",
    "All at once": "One stage that trains every layer group: the baseline the recipe "
    "claims to beat.",
    "Head only": "A linear probe: only the new classification head trains.",
    "Gradual": "Three stages that unfreeze from the head inwards: fc, then +layer4, "
    "then +layer3.",
    "Fast transfer": "One stage on cached features: conv1 and layer1 stay frozen and their "
    "outputs are computed once; layer2, layer3, layer4 and the head train on them for twice "
    f"the epochs, cosine schedule, at {FAST_TRANSFER_LR_MULT:g}x the learning rate. Several "
    "times faster per epoch than training every layer; it trades augmentation (the cache "
    "holds one view of each image), the first layers' adaptation, and memory (16 KB per "
    "image at 32 px, 800 KB at 224 px). Best when the new images resemble the backbone's.",
}


def preset_stages(name: str, epochs: int = PRESET_EPOCHS,
                  lr: float = PRESET_LR) -> tuple[StageConfig, ...]:
    """The stage list of a named preset. `epochs` is per stage (a one-stage preset trains
    2 x epochs, the same total as two stages); `lr` is the preset LR, which the first stage
    uses as it is except in "Fast transfer" (FAST_TRANSFER_LR_MULT x lr)."""
    if name == "Two-stage":
        return (
            StageConfig(groups=("layer4", "fc"), epochs=epochs, lr=lr, schedule="cosine"),
            StageConfig(groups=("layer3", "layer4", "fc"), epochs=epochs, lr=lr / 10,
                        schedule="cosine"),
        )
    if name == "All at once":
        return (StageConfig(groups=LAYER_GROUPS, epochs=2 * epochs, lr=lr, schedule="cosine"),)
    if name == "Head only":
        return (StageConfig(groups=("fc",), epochs=2 * epochs, lr=lr, schedule="cosine"),)
    if name == "Gradual":
        return (
            StageConfig(groups=("fc",), epochs=epochs, lr=lr, schedule="cosine"),
            StageConfig(groups=("layer4", "fc"), epochs=epochs, lr=lr / 3, schedule="cosine"),
            StageConfig(groups=("layer3", "layer4", "fc"), epochs=epochs, lr=lr / 10,
                        schedule="cosine"),
        )
    if name == "Fast transfer":
        return (StageConfig(groups=("layer2", "layer3", "layer4", "fc"), epochs=2 * epochs,
                            lr=FAST_TRANSFER_LR_MULT * lr, schedule="cosine",
                            feature_cache=True),)
    raise ConfigError([f"preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}"])


PRESETS: tuple[str, ...] = tuple(PRESET_DESCRIPTIONS)


def preset_config(name: str, epochs: int = PRESET_EPOCHS, lr: float = PRESET_LR,
                  **run_fields: Any) -> RunConfig:
    return RunConfig(stages=preset_stages(name, epochs=epochs, lr=lr), **run_fields)


# ---------------------------------------------------------------- validation


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_stage(stage: StageConfig, label: str) -> list[str]:
    e: list[str] = []
    if not stage.groups:
        e.append(f"{label}: trains nothing; pick at least one layer group")
    for g in stage.groups:
        if g not in LAYER_GROUPS:
            e.append(f"{label}: groups: unknown layer group {g!r} (use {', '.join(LAYER_GROUPS)})")
    if len(set(stage.groups)) != len(stage.groups):
        e.append(f"{label}: groups: a layer group is listed twice")
    if not isinstance(stage.epochs, int) or isinstance(stage.epochs, bool) or not 1 <= stage.epochs <= 1000:
        e.append(f"{label}: epochs must be a whole number from 1 to 1000")
    if stage.optimizer not in OPTIMIZERS:
        e.append(f"{label}: optimizer must be one of {', '.join(OPTIMIZERS)}")
    if not _finite(stage.lr) or stage.lr <= 0:
        e.append(f"{label}: learning rate must be greater than 0")
    elif stage.lr > 10:
        e.append(f"{label}: learning rate must be at most 10")
    if not _finite(stage.group_lr_mult) or not 0 < stage.group_lr_mult <= 1:
        e.append(f"{label}: per-group LR multiplier must be in (0, 1]")
    if not _finite(stage.weight_decay) or stage.weight_decay < 0:
        e.append(f"{label}: weight decay must be 0 or more")
    if stage.schedule not in SCHEDULES:
        e.append(f"{label}: schedule must be one of {', '.join(SCHEDULES)}")
    if not _finite(stage.warmup_epochs) or stage.warmup_epochs < 0:
        e.append(f"{label}: warm-up epochs must be 0 or more")
    elif isinstance(stage.epochs, int) and stage.warmup_epochs >= stage.epochs and stage.warmup_epochs > 0:
        e.append(f"{label}: warm-up ({stage.warmup_epochs} epochs) must be shorter than the stage "
                 f"({stage.epochs} epochs)")
    if stage.bn_policy not in BN_POLICIES:
        e.append(f"{label}: BN policy must be one of {', '.join(BN_POLICIES)}")
    e += _patience_errors(stage.plateau_patience, f"{label}: plateau_patience",
                          stage.epochs, "the stage's epochs")
    return e


def _patience_errors(patience: Any, name: str, epochs: int, of_what: str) -> list[str]:
    """A patience is off (0) or fewer epochs than it watches: a patience that can never run
    out would look like a plateau stop that silently never happens."""
    if not isinstance(patience, int) or isinstance(patience, bool) or not 0 <= patience <= 999:
        return [f"{name} must be a whole number from 0 (off) to 999"]
    if patience and isinstance(epochs, int) and epochs and patience >= epochs:
        return [f"{name} ({patience} epochs) must be less than {of_what} ({epochs}) to ever "
                f"end it; 0 turns it off"]
    return []


def validate(cfg: RunConfig) -> list[str]:
    """Every problem with `cfg`, each naming its field. Empty list = valid."""
    e: list[str] = []
    if not 1 <= len(cfg.stages) <= MAX_STAGES:
        e.append(f"stages: a run has 1 to {MAX_STAGES} stages, not {len(cfg.stages)}")
    for i, stage in enumerate(cfg.stages, 1):
        e += validate_stage(stage, f"stage {i}")
    if cfg.data_source not in DATA_SOURCES:
        e.append(f"data_source must be one of {', '.join(DATA_SOURCES)}")
    if cfg.data_source == "folder" and not cfg.data_path.strip():
        e.append("data_path: an image-folder data set needs a folder path")
    if len(set(cfg.classes)) != len(cfg.classes):
        e.append("classes: a class is listed twice")
    if cfg.classes and len(cfg.classes) < 2:
        e.append("classes: pick at least two classes (or none for all)")
    if not _finite(cfg.val_fraction) or not 0 < cfg.val_fraction < 0.9:
        e.append("val_fraction must be between 0 and 0.9 (exclusive)")
    if not _finite(cfg.test_fraction) or not 0 < cfg.test_fraction < 0.9:
        e.append("test_fraction must be between 0 and 0.9 (exclusive)")
    if not isinstance(cfg.max_train_images, int) or cfg.max_train_images < 0:
        e.append("max_train_images must be 0 (all) or a positive whole number")
    elif 0 < cfg.max_train_images < 10:
        e.append("max_train_images: use at least 10 images (or 0 for all)")
    if not isinstance(cfg.resolution, int) or not MIN_RESOLUTION <= cfg.resolution <= MAX_RESOLUTION:
        e.append(f"resolution must be a whole number from {MIN_RESOLUTION} to {MAX_RESOLUTION} pixels")
    if not isinstance(cfg.batch_size, int) or not 2 <= cfg.batch_size <= 4096:
        e.append("batch_size must be a whole number from 2 to 4096")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or not 0 <= cfg.seed <= MAX_SEED:
        e.append(f"seed must be a whole number from 0 to {MAX_SEED} (2**63 - 1)")
    if cfg.weights not in WEIGHT_SOURCES:
        e.append(f"weights must be one of {', '.join(WEIGHT_SOURCES)}")
    if cfg.weights == "file" and not cfg.weights_path.strip():
        e.append("weights_path: starting from a weights file needs its path")
    if cfg.weights == "run" and not cfg.weights_run.strip():
        e.append("weights_run: starting from a run needs that run's id")
    if cfg.device not in DEVICES:
        e.append(f"device must be one of {', '.join(DEVICES)}")
    e += _patience_errors(cfg.early_stop_patience, "early_stop_patience",
                          cfg.total_epochs if all(isinstance(s.epochs, int) for s in cfg.stages)
                          else 0, "the run's epochs")
    if not isinstance(cfg.threads, int) or not 0 <= cfg.threads <= 256:
        e.append("threads must be 0 (auto) or a whole number up to 256")
    return e


def check(cfg: RunConfig) -> RunConfig:
    errors = validate(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


# ---------------------------------------------------------------- dict / JSON round-trip


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    # JSON has no tuples; lists round-trip back to tuples in from_dict.
    d["stages"] = [{**s, "groups": list(s["groups"])} for s in d["stages"]]
    d["classes"] = list(d["classes"])
    return d


def to_json(cfg: RunConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def _coerce(value: Any, annotation: Any, key: str, errors: list[str]) -> Any:
    """Check one JSON value against a field's type. Ints are accepted for floats."""
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{key}: expected a number, got {type(value).__name__} {value!r}")
            return None
        return float(value)
    if annotation is int or annotation is bool or annotation is str:
        ok = isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
        if annotation is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if not ok:
            errors.append(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
            return None
        return value
    if typing.get_origin(annotation) is tuple:  # tuple[str, ...]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            errors.append(f"{key}: expected a list of names, got {value!r}")
            return None
        return tuple(value)
    raise TypeError(f"unsupported annotation {annotation!r}")  # programming error


def _from_fields(cls: type, data: Any, prefix: str, errors: list[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        errors.append(f"{prefix or 'config'}: expected an object, got {type(data).__name__}")
        return {}
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for k in data:
        if k not in known:
            errors.append(f"{prefix}{k}: unknown key (known: {', '.join(sorted(known))})")
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in data and f.name != "stages":
            v = _coerce(data[f.name], hints[f.name], f"{prefix}{f.name}", errors)
            if v is not None:
                out[f.name] = v
    return out


def from_dict(data: Any, validate_values: bool = True) -> RunConfig:
    """Build a RunConfig from plain data (parsed JSON). Unknown keys, wrong types and,
    when `validate_values`, invalid values raise ConfigError naming every bad field."""
    errors: list[str] = []
    kwargs = _from_fields(RunConfig, data, "", errors)
    if isinstance(data, dict) and "stages" in data:
        raw = data["stages"]
        if not isinstance(raw, list):
            errors.append("stages: expected a list of stage objects")
        else:
            stages = []
            for i, s in enumerate(raw, 1):
                skw = _from_fields(StageConfig, s, f"stage {i}: ", errors)
                stages.append(StageConfig(**skw))
            kwargs["stages"] = tuple(stages)
    cfg = RunConfig(**kwargs)  # fields with type errors fall back to their defaults...
    if validate_values:
        errors += validate(cfg)  # ...so value problems in the rest are reported too
    if errors:
        raise ConfigError(errors)
    return cfg


def _json_depth(text: str) -> int:
    """The deepest nesting of objects and arrays in JSON text (brackets inside strings do
    not count), found without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def from_json(text: str | bytes) -> RunConfig:
    """A RunConfig from JSON text, or from a file's bytes (which must be UTF-8). Every
    problem, including text that is not JSON, not UTF-8 or nested absurdly deep, is a
    ConfigError with a plain message."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")  # a byte-order mark from Windows editors is fine
        except UnicodeDecodeError as exc:
            raise ConfigError([f"config: not UTF-8 text (byte 0x{text[exc.start]:02x} at "
                               f"position {exc.start}); save the file as UTF-8"]) from None
    if _json_depth(text) > MAX_JSON_DEPTH:
        raise ConfigError([f"config: nested more than {MAX_JSON_DEPTH} levels deep; a run "
                           f"config is an object with a list of stage objects"])
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError([f"config: not valid JSON ({exc.msg} at line {exc.lineno})"]) from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of over 4,300 digits
        raise ConfigError([f"config: not a usable JSON file ({exc})"]) from None
    return from_dict(data)


def with_stage(cfg: RunConfig, index: int, **changes: Any) -> RunConfig:
    """A copy of `cfg` with stage `index` (0-based) changed."""
    stages = list(cfg.stages)
    stages[index] = replace(stages[index], **changes)
    return replace(cfg, stages=tuple(stages))


def flatten(d: dict[str, Any]) -> dict[str, Any]:
    """A config dict as one level of display values: "stage 2.lr", groups joined by "+"."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k == "stages":
            for i, s in enumerate(v, 1):
                for sk, sv in s.items():
                    out[f"stage {i}.{sk}"] = "+".join(sv) if isinstance(sv, list) else sv
        else:
            out[k] = ",".join(v) if isinstance(v, list) else v
    return out


# ---------------------------------------------------------------- form state

# A form keeps one value per field under `prefix + field name`; a "toggles" field keeps one
# bool per choice under `prefix + field name + "." + choice`. Pure: pages hand in their
# session state, core never imports streamlit.


def field_key(prefix: str, name: str, choice: str | None = None) -> str:
    return f"{prefix}{name}" if choice is None else f"{prefix}{name}.{choice}"


def form_state(obj: StageConfig | RunConfig, prefix: str) -> dict[str, Any]:
    """The form values of every field of `obj` that has a widget."""
    hints = typing.get_type_hints(type(obj))
    out: dict[str, Any] = {}
    for f, spec in specs(type(obj)):
        value = getattr(obj, f.name)
        if spec.widget == "toggles":
            out.update({field_key(prefix, f.name, c): c in value for c in spec.choices})
        elif spec.widget:
            # A number widget needs the field's own type (an int warm-up breaks a float input).
            kind = hints[f.name]
            out[field_key(prefix, f.name)] = (list(value) if isinstance(value, tuple)
                                              else kind(value) if kind in (int, float) else value)
    return out


def from_form(cls: type, state: Any, prefix: str, **fixed: Any) -> Any:
    """A `cls` (StageConfig or RunConfig) from form values: each field with a widget is read
    from `state` (a mapping) and cast to the field's type; `fixed` fields are given as they
    are; every other field keeps its default."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f, spec in specs(cls):
        if f.name in fixed or not spec.widget:
            continue
        if spec.widget == "toggles":
            kwargs[f.name] = tuple(c for c in spec.choices if state.get(field_key(prefix, f.name, c)))
        else:
            value = state[field_key(prefix, f.name)]
            kind = hints[f.name]
            kwargs[f.name] = tuple(value) if typing.get_origin(kind) is tuple else kind(value)
    return cls(**kwargs, **fixed)

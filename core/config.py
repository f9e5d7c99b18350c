"""Run and stage configuration: frozen dataclasses, validation with field-named errors,
presets, and a dict/JSON round-trip that rejects unknown keys and wrong types.

No torch import here: pages import this at start-up and must load fast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
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


class ConfigError(ValueError):
    """One or more configuration problems, each naming its field."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("; ".join(self.errors))


@dataclass(frozen=True)
class StageConfig:
    # Layer groups trained in this stage; every other group is frozen.
    groups: tuple[str, ...] = ("layer4", "fc")
    epochs: int = 1
    optimizer: str = "sgd"  # SGD with Nesterov-free momentum 0.9, or AdamW
    lr: float = 0.01
    # Per-group LR multiplier: a group k steps further from `fc` (input side) trains at
    # lr * group_lr_mult**k. 1.0 = one LR for all; 0.5 halves it per step deeper in.
    group_lr_mult: float = 1.0
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0  # linear warm-up from 0 over this many epochs (fractions ok)
    bn_policy: str = "eval"
    # Train on cached outputs of the frozen prefix (computed once, without augmentation
    # through the frozen part). Much faster when only a suffix trains; see core.engine.train.
    feature_cache: bool = False

    @property
    def trains(self) -> str:
        return "+".join(self.groups)


@dataclass(frozen=True)
class RunConfig:
    stages: tuple[StageConfig, ...] = field(default_factory=lambda: preset_stages("Two-stage"))
    # Data. "cifar10": torchvision's CIFAR-10 (downloaded into data_path, or the default
    # data root); "folder": an image folder with train/ and test/ class folders, or one
    # class-folder tree that is split into train/test.
    data_source: str = "cifar10"
    data_path: str = ""
    classes: tuple[str, ...] = ()  # empty = all classes of the data set
    val_fraction: float = 0.1  # carved from train, stratified and seeded
    test_fraction: float = 0.2  # only for a single class-folder tree without train/test
    max_train_images: int = 0  # 0 = all; a cap for quick demos (taken before the split)
    resolution: int = 32  # square input side in pixels
    batch_size: int = 128
    augment: bool = True  # random crop (padding 1/8 of the side) + horizontal flip
    seed: int = 0
    weights: str = "imagenet"
    weights_path: str = ""  # weights == "file": a state_dict or checkpoint file
    weights_run: str = ""  # weights == "run": the run id whose best checkpoint starts us
    device: str = "auto"  # auto: cuda, then mps, then cpu
    threads: int = 0  # torch intra-op threads; 0 = one per physical core

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)


# ---------------------------------------------------------------- presets

PRESET_DESCRIPTIONS: dict[str, str] = {
    "Two-stage": "Stage 1 trains the new head and layer4; stage 2 also unfreezes layer3 "
    "at a tenth of the learning rate with a cosine schedule (the recipe).",
    "All at once": "One stage that trains every layer group: the baseline the recipe "
    "claims to beat.",
    "Head only": "A linear probe: only the new classification head trains.",
    "Gradual": "Three stages that unfreeze from the head inwards: fc, then +layer4, "
    "then +layer3.",
}


def preset_stages(name: str, epochs: int = 1, lr: float = 0.01) -> tuple[StageConfig, ...]:
    """The stage list of a named preset. `epochs` is per stage, `lr` the first stage's LR."""
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
    raise ConfigError([f"preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}"])


PRESETS: tuple[str, ...] = tuple(PRESET_DESCRIPTIONS)


def preset_config(name: str, epochs: int = 1, lr: float = 0.01, **run_fields: Any) -> RunConfig:
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
    return e


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
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        e.append("seed must be a whole number, 0 or more")
    if cfg.weights not in WEIGHT_SOURCES:
        e.append(f"weights must be one of {', '.join(WEIGHT_SOURCES)}")
    if cfg.weights == "file" and not cfg.weights_path.strip():
        e.append("weights_path: starting from a weights file needs its path")
    if cfg.weights == "run" and not cfg.weights_run.strip():
        e.append("weights_run: starting from a run needs that run's id")
    if cfg.device not in DEVICES:
        e.append(f"device must be one of {', '.join(DEVICES)}")
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


def from_json(text: str) -> RunConfig:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError([f"config: not valid JSON ({exc.msg} at line {exc.lineno})"]) from None
    return from_dict(data)


def with_stage(cfg: RunConfig, index: int, **changes: Any) -> RunConfig:
    """A copy of `cfg` with stage `index` (0-based) changed."""
    stages = list(cfg.stages)
    stages[index] = replace(stages[index], **changes)
    return replace(cfg, stages=tuple(stages))


def diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Flattened fields whose values differ between two config dicts ("stage 2.lr": (x, y))."""
    fa, fb = flatten(a), flatten(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def flatten(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k == "stages":
            for i, s in enumerate(v, 1):
                for sk, sv in s.items():
                    out[f"stage {i}.{sk}"] = "+".join(sv) if isinstance(sv, list) else sv
        else:
            out[k] = ",".join(v) if isinstance(v, list) else v
    return out

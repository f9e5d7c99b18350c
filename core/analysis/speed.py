"""Estimated training time per epoch, for the New run page. No torch import (pages load fast).

Estimates come from measured throughput first: the `images_per_s` metric rows that runs in
the run store recorded for a stage that trains the same layer groups, at the same
resolution, with the same feature-cache choice (median of the most recent ones). Without
such runs, a per-group cost model calibrated with `python -m benchmarks.throughput` on a
2-core AVX-512 (with bf16) CPU at 32x32 with the trainer's default CPU runtime.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from core.config import LAYER_GROUPS
from core.runs.entities import TRAINING_KINDS

# Per-image cost in milliseconds at 32x32 on the calibration CPU (benchmarks/README.md),
# with the trainer's default CPU runtime there (bf16 where the CPU has it): a frozen group
# runs forward only (BN folded, no autograd); a trained group runs forward + backward +
# optimizer step. layer4 is cheap at 32x32: its maps are 1x1, so it runs as matrix products.
_FROZEN_MS = {"conv1": 0.055, "layer1": 0.055, "layer2": 0.030, "layer3": 0.033, "layer4": 0.010, "fc": 0.0}
_TRAINED_MS = {"conv1": 0.19, "layer1": 0.26, "layer2": 0.153, "layer3": 0.234, "layer4": 0.138, "fc": 0.005}
_STEP_OVERHEAD_MS = 0.02  # per image: batching, augmentation, normalisation, loss
MAX_RUNS_SCANNED = 40  # newest runs looked at for measured throughput
MAX_SAMPLES = 12  # newest matching epoch measurements used


def estimate_epoch_seconds(groups: Sequence[str], n_images: int, resolution: int = 32,
                           feature_cache: bool = False, store: Any = None,
                           device: str | None = None) -> float:
    """Seconds for one training epoch of `n_images` when `groups` train.

    `store`: a RunStore to take measured speeds from (default: the app's store, if it
    exists); `device`: only use runs recorded on this device ("cpu", "cuda", ...)."""
    measured = measured_images_per_s(groups, resolution, feature_cache, store, device)
    if measured:
        return n_images / measured
    return model_epoch_seconds(groups, n_images, resolution, feature_cache)


def model_epoch_seconds(groups: Sequence[str], n_images: int, resolution: int = 32,
                        feature_cache: bool = False) -> float:
    """The calibrated cost model alone (no measurements)."""
    first = min((LAYER_GROUPS.index(g) for g in groups if g in LAYER_GROUPS),
                default=len(LAYER_GROUPS) - 1)
    ms = _STEP_OVERHEAD_MS
    for i, g in enumerate(LAYER_GROUPS):
        if i < first:
            ms += 0.0 if feature_cache else _FROZEN_MS[g]
        else:
            ms += _TRAINED_MS[g]
    # Convolution cost grows with the pixel count; the calibration is at 32x32.
    scale = (resolution / 32) ** 2
    return n_images * ms * scale / 1000.0


def _default_store() -> Any:
    from core.runs.store import RunStore
    from core.settings import StoreLayout

    root = StoreLayout.default().root
    if not StoreLayout(root).database.exists():
        return None  # do not create a store just to estimate
    return RunStore(root)


def measured_images_per_s(groups: Sequence[str], resolution: int = 32, feature_cache: bool = False,
                          store: Any = None, device: str | None = None) -> float | None:
    """Median training images/s recorded by recent runs for a stage like this one, or None."""
    try:
        store = store if store is not None else _default_store()
        if store is None:
            return None
        want = set(groups)
        samples: list[float] = []
        for run in store.list_runs(kinds=TRAINING_KINDS)[:MAX_RUNS_SCANNED]:
            cfg = run.config
            if cfg.resolution != resolution:
                continue
            if device and not run.results.device.startswith(device):
                continue
            stages = [i for i, s in enumerate(cfg.stages, 1)
                      if set(s.groups) == want and s.feature_cache == bool(feature_cache)]
            if not stages:
                continue
            rows = [m for m in store.metrics(run.id, keys=["images_per_s"]) if m.stage in stages]
            samples += [m.value for m in sorted(rows, key=lambda m: -m.id) if m.value > 0]
            if len(samples) >= MAX_SAMPLES:
                break
        return statistics.median(samples[:MAX_SAMPLES]) if samples else None
    except Exception:  # an unreadable store must not break the page: fall back to the model
        return None


# ---------------------------------------------------------------- how sure an estimate is

ESTIMATE_BASES = ("measured", "scaled", "model")


@dataclass(frozen=True)
class EpochEstimate:
    """Seconds for one training epoch and what the figure rests on: "measured" (earlier
    runs trained these groups at this resolution on this store's machine), "scaled" (the
    cost model scaled by how fast other runs here went against it), "model" (the cost
    model alone, calibrated on another CPU: rough)."""

    seconds: float
    basis: str
    samples: int = 0  # epochs of other recipes a "scaled" figure comes from

    def describe(self) -> str:
        """'about 2 min (rough: no runs on this machine yet)'."""
        text = f"about {_duration(self.seconds)}"
        if self.basis == "measured":
            return f"{text} (measured on earlier runs like this one)"
        if self.basis == "scaled":
            return f"{text} (scaled from {self.samples} epoch(s) of other recipes here)"
        return f"{text} (rough: no runs on this machine yet)"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def machine_factor(store: Any = None, device: str | None = None) -> tuple[float, int] | None:
    """(measured speed / cost-model speed, epochs measured) over recent runs of any recipe:
    how much faster (>1) or slower this machine is than the calibration CPU. None when no
    run has been timed."""
    try:
        store = store if store is not None else _default_store()
        if store is None:
            return None
        ratios: list[float] = []
        for run in store.list_runs(kinds=TRAINING_KINDS)[:MAX_RUNS_SCANNED]:
            cfg = run.config
            if device and not run.results.device.startswith(device):
                continue
            rows = store.metrics(run.id, keys=["images_per_s"])
            for m in sorted(rows, key=lambda m: -m.id):
                if m.value <= 0 or not 1 <= m.stage <= len(cfg.stages):
                    continue
                stage = cfg.stages[m.stage - 1]
                model_ips = 1.0 / model_epoch_seconds(stage.groups, 1, cfg.resolution,
                                                      stage.feature_cache)
                ratios.append(m.value / model_ips)
            if len(ratios) >= MAX_SAMPLES:
                break
        return (statistics.median(ratios[:MAX_SAMPLES]), len(ratios[:MAX_SAMPLES])) if ratios else None
    except Exception:  # an unreadable store must not break the page
        return None


def epoch_estimate(groups: Sequence[str], n_images: int, resolution: int = 32,
                   feature_cache: bool = False, store: Any = None,
                   device: str | None = None) -> EpochEstimate:
    """estimate_epoch_seconds with how sure it is; without a run like this one, the cost
    model is scaled by this machine's measured speed on other recipes when there is any."""
    measured = measured_images_per_s(groups, resolution, feature_cache, store, device)
    if measured:
        return EpochEstimate(n_images / measured, "measured")
    model = model_epoch_seconds(groups, n_images, resolution, feature_cache)
    factor = machine_factor(store, device)
    if factor is not None:
        return EpochEstimate(model / factor[0], "scaled", factor[1])
    return EpochEstimate(model, "model")

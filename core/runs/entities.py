"""What the run store hands out: typed, immutable values, never database rows or dicts.

The store (core.runs.store) is the only place that turns these into JSON and back. No torch
import here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from core.config import RunConfig

STATUSES = ("queued", "running", "finished", "failed", "cancelled")
ACTIVE = ("queued", "running")
DONE = ("finished", "failed", "cancelled")

# What a run is for. "training": a run the user started (New run, an experiment, the CLI);
# "trial": a run a search started (a training run too: it opens and compares like one);
# "lr_finder": a learning-rate range test; "export": a model export. Lists of results show
# TRAINING_KINDS; the other kinds are tools' records, reached from the tool that made them.
KINDS = ("training", "trial", "lr_finder", "export")
TRAINING_KINDS = ("training", "trial")


@dataclass(frozen=True)
class RunProgress:
    """Where a running run is, as its worker last reported it."""

    phase: str = ""  # "loading data", "caching features", "training", "validating", "testing"
    message: str = ""  # what is being done, in words (while loading data)
    fraction: float = 0.0  # 0..1 of the whole run
    stage: int | None = None  # 1-based
    stages: int | None = None
    epoch: int | None = None  # 1-based within the stage
    epochs: int | None = None  # epochs of this stage
    global_epoch: int | None = None  # 1-based across the run
    total_epochs: int | None = None
    step: int | None = None  # 1-based within the epoch
    steps_per_epoch: int | None = None
    eta_s: float | None = None  # seconds left; None until an epoch has been timed
    data_fraction: float | None = None  # 0..1 of the data loaded (while loading data)
    updated_at: float | None = None  # time.time() of the report


@dataclass(frozen=True)
class SplitSizes:
    """Images in each split."""

    train: int
    val: int
    test: int


@dataclass(frozen=True)
class StageWeightChange:
    """How far each layer group moved during one stage: ||W_end - W_start|| / ||W_start||."""

    stage: int  # 1-based
    groups: dict[str, float]  # layer group -> relative change


@dataclass(frozen=True)
class RunResults:
    """What a run found out, filled in as it goes: the data when it is loaded, the weight
    change at each stage end, the test evaluation at the end."""

    classes: list[str] = field(default_factory=list)
    data: str = ""  # where the images came from, in words
    sizes: SplitSizes | None = None
    device: str = ""  # the torch device it trained on ("cpu", "cuda:0", ...)
    skipped_files: int = 0  # unreadable files left out
    skipped_examples: list[str] = field(default_factory=list)  # the first few of them
    weights: str = ""  # the starting weights, in words
    test_loss: float | None = None
    per_class_acc: list[float | None] = field(default_factory=list)  # None: class not in test
    confusion: list[list[int]] = field(default_factory=list)  # rows: true class; cols: predicted
    seconds: float | None = None  # training wall time
    weight_change: list[StageWeightChange] = field(default_factory=list)


@dataclass(frozen=True)
class Run:
    id: str
    name: str
    group: str
    status: str
    config: RunConfig
    created_at: float
    # Why the stored config no longer loads (then `config` is the default, and the run
    # cannot be started or resumed), or None.
    config_error: str | None = None
    pid: int | None = None
    # The process's creation time (psutil, seconds since the epoch as text): with the pid it
    # names one process, so a reused pid is never mistaken for the worker.
    pid_start: str | None = None
    host: str | None = None
    # Where it executes: "local" or "ray" (None: not dispatched yet, or recorded before
    # executors existed), and the executor's id for it (a Ray submission id).
    executor: str | None = None
    job_id: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    heartbeat_at: float | None = None
    error: str | None = None
    cancel_requested: bool = False
    progress: RunProgress = field(default_factory=RunProgress)
    best_val_acc: float | None = None
    best_stage: int | None = None
    best_epoch: int | None = None
    # The best checkpoint's path on this machine (the store records it relative to the
    # run's folder), or None before the first validated epoch.
    best_checkpoint: str | None = None
    test_acc: float | None = None
    # The global step of the last saved epoch: where a resume picks up (-1: none saved).
    last_step: int = -1
    results: RunResults = field(default_factory=RunResults)
    note: str = ""  # the user's free-text note
    tags: tuple[str, ...] = ()  # the user's labels, sorted
    kind: str = "training"  # one of KINDS
    # Who started it: the signed-in e-mail when the dashboard has sign-in, else the user
    # account that submitted it (command line, dashboard on one machine); "" if unknown.
    started_by: str = ""

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.ended_at or time.time()) - self.started_at


@dataclass(frozen=True)
class MetricRow:
    # The row's number within its run (1, 2, ... in the order they were committed): the
    # cursor of incremental reads (RunStore.metrics(after_id=...)).
    id: int
    run_id: str
    stage: int
    epoch: float  # fractional inside an epoch for step-level rows (e.g. 1.25)
    step: int  # global optimizer step within the run
    key: str  # "train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch_s", ...
    value: float
    time: float


@dataclass(frozen=True)
class Recipe:
    """One arm of an experiment: a config run over the experiment's seeds."""

    name: str  # shown to the user: a preset name or "config of run X"
    group: str  # the run group its seed runs were queued under
    config: RunConfig  # the recipe's config (seed replaced per run)


@dataclass(frozen=True)
class Experiment:
    """Recipes compared over seeds (core.analysis.experiments computes the statistics from
    the recipes' run groups, so the record never goes stale)."""

    id: str
    name: str
    created_at: float
    seeds: tuple[int, ...]
    recipes: tuple[Recipe, ...]
    note: str = ""  # free text, as on runs
    tags: tuple[str, ...] = ()  # sorted, trimmed (store.normalize_tags), as on runs

"""What a training run leaves behind, as it goes: the checkpoint policy (which checkpoints
exist and when each is written) and the recorder that turns the trainer's hooks into store
writes (metrics, progress, best epoch, resume point, weight change) and checkpoint files.

Torch is imported lazily: the checkpoint policy is plain data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import RunConfig
from core.faults import fault_point
from core.runs.entities import RunProgress, RunResults, SplitSizes, StageWeightChange
from core.settings import RunFiles
from core.runs.jobs import HEARTBEAT_S
from core.runs.store import RunStore

if TYPE_CHECKING:
    from core.engine.data import DataSplits
    from core.engine.train import EpochEnd, TrainHooks

log = logging.getLogger("finetune_lab.worker")
CANCEL_POLL_S = 0.2  # how often the training loop asks the store about cancellation, seconds
# Set by SIGTERM. A signal handler must not touch the store (the main thread may be inside
# a write transaction), so it only sets this; the training loop stops at the next batch.
TERMINATED = threading.Event()


# ---------------------------------------------------------------- checkpoint policy


class CheckpointKind(Enum):
    BEST = "best"  # the best validation accuracy so far: what Classify and export use
    LAST = "last"  # the latest epoch with optimizer/scheduler/RNG state: where resume starts
    STAGE_END = "stage end"  # the model at the end of a stage, for before/after comparisons


@dataclass(frozen=True)
class CheckpointWrite:
    kind: CheckpointKind
    path: Path
    with_training_state: bool


@dataclass(frozen=True)
class CheckpointPolicy:
    """Which checkpoints a run keeps and when each is written, in the order to write them."""

    files: RunFiles
    stage_epochs: tuple[int, ...]  # epochs of each stage
    # Stages whose end is kept as its own file: the first of a multi-stage run, so Classify
    # can compare the model before and after the later stages.
    kept_stage_ends: tuple[int, ...] = ()

    @classmethod
    def for_run(cls, files: RunFiles, cfg: RunConfig) -> CheckpointPolicy:
        epochs = tuple(s.epochs for s in cfg.stages)
        return cls(files, epochs, kept_stage_ends=(1,) if len(epochs) > 1 else ())

    def writes(self, stage: int, epoch: int, is_best: bool,
               ended: bool = False) -> list[CheckpointWrite]:
        """The checkpoints to write after `epoch` (1-based) of `stage` (1-based), last.pt
        last: it is the resume point, so once it names an epoch every other file of that
        epoch is whole (killed before it, the resumed run redoes the epoch and writes them).
        `ended`: the trainer ended the stage there (a plateau stop ends it before its last
        epoch)."""
        out = []
        if is_best:
            out.append(CheckpointWrite(CheckpointKind.BEST, self.files.best, False))
        if stage in self.kept_stage_ends and self.stage_ended(stage, epoch, ended):
            out.append(CheckpointWrite(CheckpointKind.STAGE_END, self.files.stage_end(stage), False))
        out.append(CheckpointWrite(CheckpointKind.LAST, self.files.last, True))
        return out

    def stage_ended(self, stage: int, epoch: int, ended: bool = False) -> bool:
        return ended or epoch == self.stage_epochs[stage - 1]


# ---------------------------------------------------------------- heartbeat


class Heartbeat:
    """A thread that reports liveness and the latest progress every HEARTBEAT_S seconds and
    turns a cancel request (from the store, or SIGTERM) into an Event the trainer polls
    between batches, so polling costs the training loop nothing."""

    def __init__(self, store: RunStore, run_id: str, interval_s: float = HEARTBEAT_S,
                 on_progress: Callable[[RunProgress], None] | None = None):
        self.store, self.run_id, self.interval_s = store, run_id, interval_s
        self.on_progress = on_progress
        self.cancel = threading.Event()
        self._progress: RunProgress | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_poll = 0.0
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._beat()  # final progress

    def should_stop(self) -> bool:
        """Checked before every batch. Reads the store's cancel flag at most every
        CANCEL_POLL_S (a ~1 ms query), so a cancel lands within one batch, not one beat."""
        if self.cancel.is_set() or TERMINATED.is_set():
            return True
        now = time.monotonic()
        if now - self._last_poll >= CANCEL_POLL_S:
            self._last_poll = now
            try:
                if self.store.cancel_requested(self.run_id):
                    self.cancel.set()
            except Exception:  # busy store: the heartbeat thread will catch it
                pass
        return self.cancel.is_set()

    def set_progress(self, progress: RunProgress) -> None:
        progress = replace(progress, updated_at=time.time())
        with self._lock:
            self._progress = progress
        if self.on_progress:
            self.on_progress(progress)

    def _beat(self) -> None:
        with self._lock:
            progress, self._progress = self._progress, None
        try:
            if self.store.heartbeat(self.run_id, progress):
                self.cancel.set()
        except Exception as exc:  # a busy/full store must not kill training
            log.warning("heartbeat failed: %s", exc)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._beat()


# ---------------------------------------------------------------- recorder


@dataclass
class RunRecorder:
    """The trainer's hooks for one run: metrics and progress to the store, checkpoints by
    the policy, the best epoch and resume point recorded, weight change per stage."""

    store: RunStore
    run_id: str
    policy: CheckpointPolicy
    heartbeat: Heartbeat
    config: dict[str, Any]  # what checkpoints carry: core.config.to_dict of the run's config
    classes: list[str]
    preprocess: dict[str, Any]
    results: RunResults = field(default_factory=RunResults)
    # Weights at the start of the current stage, to measure how far each layer group moved
    # in it. After a resume mid-stage they are the resumed weights, so that stage's
    # movement counts from the resume point.
    stage_start: dict[str, Any] = field(default_factory=dict)

    @property
    def hooks(self) -> TrainHooks:
        from core.engine.train import TrainHooks

        return TrainHooks(on_metrics=lambda rows: self.store.log_metrics(self.run_id, rows),
                          on_progress=self.progress, should_stop=self.before_batch,
                          on_epoch_end=self.on_epoch_end)

    def before_batch(self) -> bool:
        """The trainer asks before every batch whether to stop."""
        fault_point("batch")
        return self.heartbeat.should_stop()

    def progress(self, report: dict[str, Any]) -> None:
        """The trainer's progress report (core.engine.train), as the run's progress."""
        self.heartbeat.set_progress(RunProgress(**report))

    def record(self, test_acc: float | None = None, **changes: Any) -> None:
        """Change fields of the run's results (and its test accuracy) and store them."""
        self.results = replace(self.results, **changes)
        self.store.set_results(self.run_id, self.results, test_acc=test_acc)

    def record_data(self, splits: DataSplits, device: str) -> None:
        self.record(classes=list(splits.classes), data=splits.source,
                    skipped_files=len(splits.skipped), skipped_examples=splits.skipped[:20],
                    sizes=SplitSizes(len(splits.train), len(splits.val), len(splits.test)),
                    device=device)

    def start_stage_at(self, model: Any) -> None:
        self.stage_start = {k: v.detach().clone() for k, v in model.named_parameters()}

    def on_epoch_end(self, end: EpochEnd) -> None:
        from core.engine.checkpoints import Checkpoint, save_checkpoint

        metrics = {"val_acc": end.val_acc, "val_loss": end.val_loss,
                   "train_loss": end.train.loss, "train_acc": end.train.acc}
        if self.policy.stage_ended(end.stage, end.epoch, end.stage_ended):
            # Before last.pt, like everything the epoch records: a run killed after last.pt
            # resumes past this stage and would never record it.
            change = StageWeightChange(end.stage, relative_weight_change(end.model, self.stage_start))
            self.record(weight_change=[*(w for w in self.results.weight_change
                                         if w.stage != end.stage), change])
        for write in self.policy.writes(end.stage, end.epoch, end.is_best, end.stage_ended):
            self.progress({"phase": "saving checkpoint", "stage": end.stage,
                           "epoch": end.epoch, "epochs": self.policy.stage_epochs[end.stage - 1],
                           "stages": len(self.policy.stage_epochs),
                           "fraction": end.global_epoch / sum(self.policy.stage_epochs),
                           "message": f"Saving {write.path.name} ({write.kind.value})"})
            if write.kind is CheckpointKind.LAST:
                # Where a resume picks up: store.requeue drops rows past this step. Recorded
                # before last.pt is written: killed in between, requeue keeps a few rows
                # too many and the worker's own truncation (at the checkpoint's step)
                # removes them; the other order could drop the rows of an epoch that the
                # last checkpoint does hold.
                self.store.set_last_step(self.run_id, end.step)
            save_checkpoint(write.path, Checkpoint.of_model(
                end.model, self.config, self.classes, self.preprocess, end.stage, end.epoch,
                metrics, end.training_state if write.with_training_state else None))
            if write.kind is CheckpointKind.BEST:
                self.store.set_best(self.run_id, end.val_acc, end.stage, end.epoch, write.path)
        if self.policy.stage_ended(end.stage, end.epoch, end.stage_ended):
            self.start_stage_at(end.model)
        log.info("stage %d epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f s",
                 end.stage, end.epoch, end.train.loss, end.train.acc, end.val_loss,
                 end.val_acc, end.train.seconds)


def relative_weight_change(model: Any, start: dict[str, Any]) -> dict[str, float]:
    """Per layer group: ||W_now - W_start|| / ||W_start|| over the group's parameters."""
    from core.config import LAYER_GROUPS
    from core.engine.model import GROUP_MODULES

    out = {}
    for g in LAYER_GROUPS:
        num = den = 0.0
        for name, p in model.named_parameters():
            if name.split(".")[0] in GROUP_MODULES[g]:
                w0 = start[name].to(p.device)
                num += float((p.detach() - w0).float().pow(2).sum())
                den += float(w0.float().pow(2).sum())
        out[g] = (num ** 0.5) / (den ** 0.5) if den > 0 else 0.0
    return out

"""What a training run leaves behind, as it goes: the checkpoint policy (which checkpoints
exist and when each is written), the store writer every write of a worker goes through
(riding through store outages), and the recorder that turns the trainer's hooks into store
writes (metrics, progress, best epoch, resume point, weight change) and checkpoint files.

Torch is imported lazily: the checkpoint policy is plain data.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import tenacity

from core.config import RunConfig
from core.faults import fault_point
from core.runs.entities import RunProgress, RunResults, SplitSizes, StageWeightChange
from core.runs.jobs import HEARTBEAT_S
from core.runs.store import RunStore, StoreError, store_failure_reason
from core.settings import RunFiles, store_retry_s

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


# ---------------------------------------------------------------- store writes

T = TypeVar("T")
RETRY_MAX_WAIT_S = 2.0  # the longest pause between two tries of a write, seconds
MAX_ROWS_PER_WRITE = 2000  # metric rows buffered during an outage go in writes of this many
# SQLite's words for a write that found no room; "disk I/O error" counts only when the
# disk really is nearly full (it has other causes).
SQLITE_FULL_TEXT = "database or disk is full"
SQLITE_IOERR_TEXT = "disk I/O error"
NEARLY_FULL_BYTES = 64 * 1024**2


def disk_full_at(exc: BaseException, store: RunStore) -> Path | None:
    """Where the disk filled up, when `exc` (or an exception it came from) says it did."""
    import errno
    import shutil
    import sqlite3

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return Path(seen.filename) if seen.filename else store.root
        if isinstance(seen, sqlite3.Error):
            text = str(seen)
            if SQLITE_FULL_TEXT in text:
                return store.db_path
            if SQLITE_IOERR_TEXT in text and shutil.disk_usage(store.root).free < NEARLY_FULL_BYTES:
                return store.db_path
        seen = seen.__cause__ or seen.__context__
    return None


def disk_full_message(path: Path) -> str:
    """What a run that filled a disk says, wherever the disk filled (checkpoint or store)."""
    return f"disk full at {path}: free space and resume"


class StoreUnavailable(StoreError):
    """The worker gave up on the store: it could not be written for the whole retry window
    (or its disk is full). The message is the run's one-line error."""


class StoreWriter:
    """Every store write of one worker goes through here, so a store that blinks (a
    PostgreSQL restart or failover, a locked or full SQLite file) does not fail the run.

    - Metric rows are buffered and written by a background thread: training never waits
      on a per-step write. Each write carries a token (RunStore.log_metrics' `batch`), so a
      write retried after a commit whose acknowledgement was lost adds nothing twice.
    - Other writes (`write`) first wait for the buffered rows, then run in order: what the
      trainer records at an epoch's end (results, best epoch, resume point) lands after that
      epoch's rows, before its checkpoint names the epoch as done.
    - A failing write is retried with exponential backoff (tenacity) while the store has
      been failing for less than `retry_s` seconds ($FINETUNE_LAB_STORE_RETRY_S); then
      StoreUnavailable names the store (never its password) and the cause, in one line.
      A full disk is not waited for: it says where it is at once.
    - `settle` records the run's outcome with a window of its own, so a run that gave up
      on the store still records why once the store is back.
    """

    def __init__(self, store: RunStore, run_id: str, retry_s: float | None = None):
        self.store, self.run_id = store, run_id
        self.retry_s = store_retry_s() if retry_s is None else retry_s
        self._cond = threading.Condition()
        self._pending: collections.deque[list[tuple[int, float, int, str, float]]] = (
            collections.deque())
        self._writing = False  # the thread holds rows taken off _pending
        self._down_since: float | None = None  # monotonic time of the first failure
        self._closed = False
        self.failure: BaseException | None = None  # why buffered rows can no longer be written
        self._thread = threading.Thread(target=self._drain, name="store-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the outage clock

    @property
    def store_down(self) -> bool:
        """Whether the last write failed (the store is in an outage)."""
        with self._cond:
            return self._down_since is not None

    def attempt(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn` once, keeping the outage clock: a failure starts it, a success stops it."""
        try:
            result = fn(*args, **kwargs)
        except StoreError as exc:
            with self._cond:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("run store %s unavailable (%s): retrying for up to %.0f s",
                                self.store.location, store_failure_reason(exc), self.retry_s)
            raise
        with self._cond:
            if self._down_since is not None:
                log.warning("run store %s is back after %.1f s", self.store.location,
                            time.monotonic() - self._down_since)
                self._down_since = None
        return result

    def _outage_over(self, _state: tenacity.RetryCallState, full_disk_ends: bool = True) -> bool:
        """tenacity's stop condition: the store has failed for the whole window, or its
        disk is full (unless `full_disk_ends` is False: recording an outcome waits for room)."""
        with self._cond:
            since = self._down_since
        exc = _state.outcome.exception() if _state.outcome else None
        if full_disk_ends and exc is not None and disk_full_at(exc, self.store) is not None:
            return True
        return since is not None and time.monotonic() - since >= self.retry_s

    def _retrying(self, fn: Callable[..., T], *args: Any, _wait_for_room: bool = False,
                  **kwargs: Any) -> T:
        try:
            for try_ in tenacity.Retrying(
                    retry=tenacity.retry_if_exception_type(StoreError),
                    stop=lambda state: self._outage_over(state, not _wait_for_room),
                    wait=tenacity.wait_exponential(multiplier=0.05, max=RETRY_MAX_WAIT_S),
                    reraise=True):
                with try_:
                    return self.attempt(fn, *args, **kwargs)
        except StoreUnavailable:
            raise
        except StoreError as exc:
            raise self._gave_up(exc) from exc
        raise AssertionError("unreachable: tenacity returns or raises")

    def _gave_up(self, exc: StoreError) -> StoreUnavailable:
        full = disk_full_at(exc, self.store)
        if full is not None:
            return StoreUnavailable(disk_full_message(full))
        return StoreUnavailable(
            f"the run store at {self.store.location} could not be written for "
            f"{self.retry_s:g} s ({store_failure_reason(exc)}): the run stopped; resume it "
            f"once the store is back")

    # ------------------------------------------------------------ writes

    def log_metrics(self, rows: list[tuple[int, float, int, str, float]]) -> None:
        """Buffer metric rows for the background thread (returns at once). Raises the
        reason when buffered rows could not be written (the run must stop)."""
        if self.failure is not None:
            raise self.failure
        if rows:
            with self._cond:
                self._pending.append(list(rows))
                self._cond.notify_all()

    def flush(self) -> None:
        """Wait until every buffered row is in the store; raises why when it cannot be."""
        with self._cond:
            while (self._pending or self._writing) and self.failure is None:
                self._cond.wait()
        if self.failure is not None:
            raise self.failure

    def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` (a RunStore method) after the buffered rows, retried
        through an outage; StoreUnavailable when the window passes."""
        self.flush()
        return self._retrying(fn, *args, **kwargs)

    def settle(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Record the run's outcome: buffered rows first when they can still be written,
        then `fn`, retried with a window that starts now (a run that gave up on the store
        records why once it is back; a full disk is waited out too, so "disk full at ..."
        lands as soon as the user frees space, not "exited without reporting a result")."""
        try:
            self.flush()
        except Exception as exc:  # the outcome matters more than the rows of an ended run
            log.warning("metric rows not written: %s", exc)
        with self._cond:
            self._down_since = None
        return self._retrying(fn, *args, _wait_for_room=True, **kwargs)

    def close(self) -> None:
        """Stop the background thread (buffered rows are written first, when they can)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=self.retry_s + 30)

    def _drain(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending or self.failure is not None:
                    return
                rows: list[tuple[int, float, int, str, float]] = []
                while self._pending and len(rows) < MAX_ROWS_PER_WRITE:
                    rows += self._pending.popleft()
                self._writing = True
            token = uuid.uuid4().hex  # one per write, kept across its retries
            try:
                self._retrying(self.store.log_metrics, self.run_id, rows, batch=token)
            except BaseException as exc:  # the main thread raises it at its next write
                log.error("metric rows not written: %s", exc)
                with self._cond:
                    self.failure = exc
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()


# ---------------------------------------------------------------- heartbeat


class Heartbeat:
    """A thread that reports liveness and the latest progress every HEARTBEAT_S seconds and
    turns a cancel request (from the store, or SIGTERM) into an Event the trainer polls
    between batches, so polling costs the training loop nothing."""

    def __init__(self, writer: StoreWriter, interval_s: float = HEARTBEAT_S,
                 on_progress: Callable[[RunProgress], None] | None = None,
                 on_beat: Callable[[], None] | None = None):
        self.writer, self.interval_s = writer, interval_s
        self.store, self.run_id = writer.store, writer.run_id
        self.on_progress = on_progress
        self.on_beat = on_beat  # called on the heartbeat thread after each beat
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
        # In an outage the heartbeat finds out when the store is back: a read here could
        # wait for a connect timeout between two batches.
        if now - self._last_poll >= CANCEL_POLL_S and not self.writer.store_down:
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
            if self.writer.attempt(self.store.heartbeat, self.run_id, progress):
                self.cancel.set()
        except Exception as exc:  # the next beat tries again; the writer keeps the clock
            with self._lock:
                self._progress = self._progress or progress  # sent with the next beat
            if not isinstance(exc, StoreError):
                log.warning("heartbeat failed: %s", exc)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._beat()
            if self.on_beat is not None:
                try:
                    self.on_beat()
                except Exception as exc:  # never stops the heartbeat
                    log.warning("%s", exc)


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

        return TrainHooks(on_metrics=self.heartbeat.writer.log_metrics,
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
        self.heartbeat.writer.write(self.store.set_results, self.run_id, self.results,
                                    test_acc=test_acc)

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
                self.heartbeat.writer.write(self.store.set_last_step, self.run_id, end.step)
            save_checkpoint(write.path, Checkpoint.of_model(
                end.model, self.config, self.classes, self.preprocess, end.stage, end.epoch,
                metrics, end.training_state if write.with_training_state else None))
            if write.kind is CheckpointKind.BEST:
                self.heartbeat.writer.write(self.store.set_best, self.run_id, end.val_acc,
                                            end.stage, end.epoch, write.path)
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

"""A job's `__main__`: claims a run, heartbeats, calls the trainer, records the outcome.

    python -m core.runs.worker RUN_ID [--data-dir DIR]

`execute_run` is also what the command line calls in the foreground, so scripted runs and
dashboard runs go through exactly the same code and land in the same store.
"""

from __future__ import annotations

import dataclasses
import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core import config as cfgmod
from core.faults import fault_point
from core.runs.entities import Run, RunProgress
from core.settings import ARTIFACTS_ENV, RunFiles
from core.analysis import export, lr_finder
from core.runs.jobs import dispatch
from core.runs.preflight import donor_checkpoint
from core.runs.recorder import (  # noqa: F401  (disk_full_at: also this module's vocabulary)
    TERMINATED,
    CheckpointPolicy,
    Heartbeat,
    RunRecorder,
    StoreUnavailable,
    StoreWriter,
    disk_full_at,
    disk_full_message,
)
from core.runs.store import RunStore, StoreError

if TYPE_CHECKING:
    import torch

    from core.engine.data import DataSplits, Preprocess
    from core.engine.train import ResumeState, Runtime

log = logging.getLogger("finetune_lab.worker")
# Tools' jobs, by run kind: each does its work in this process with the heartbeat (progress,
# cancel) and raises what a training run would (Cancelled, DataError, ...).
TOOL_JOBS: dict[str, Callable[[RunStore, Run, Heartbeat], None]] = {
    "lr_finder": lr_finder.run_job, "export": export.run_job}


# How often a worker of the local queue makes sure the store's queue supervisor lives,
# seconds: a supervisor killed before the worker would otherwise leave the queue stalled
# when the worker dies too (issue 22.2).
SUPERVISOR_CHECK_S = 5.0


def execute_run(store: RunStore, run_id: str,
                on_progress: Callable[[RunProgress], None] | None = None,
                watch_queue: bool = False) -> str:
    """Run the (already claimed, status running) run to its end. Returns the final status.
    Every outcome is recorded in the store; exceptions do not escape. Store writes go
    through a StoreWriter (riding through outages). `watch_queue`: a worker of the local
    queue restarts the queue supervisor if it dies while runs wait."""
    run = store.get_run(run_id)
    if run is None:
        raise SystemExit(f"run {run_id} not found in {store.root}")
    writer = StoreWriter(store, run_id)
    try:
        return _execute(store, run, writer, on_progress,
                        _supervisor_keeper(store, writer) if watch_queue else None)
    finally:
        writer.close()


def _supervisor_keeper(store: RunStore, writer: StoreWriter) -> Callable[[], None]:
    """A heartbeat callback that starts the queue supervisor when none runs while runs wait
    in the queue (at most every SUPERVISOR_CHECK_S; not while the store is down)."""
    from core.runs import supervisor

    last = 0.0

    def keep() -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < SUPERVISOR_CHECK_S or writer.store_down:
            return
        last = now
        if not supervisor.is_running(store) and store.list_runs(statuses=("queued",)):
            log.warning("the queue supervisor is gone while runs wait: starting one")
            supervisor.ensure_running(store)
    return keep


def _execute(store: RunStore, run: Run, writer: StoreWriter,
             on_progress: Callable[[RunProgress], None] | None,
             on_beat: Callable[[], None] | None) -> str:
    from core.engine.checkpoints import CheckpointError
    from core.engine.data import DataError
    from core.engine.model import WeightsError
    from core.engine.train import Cancelled, Diverged, run_stages

    run_id = run.id
    with Heartbeat(writer, on_progress=on_progress, on_beat=on_beat) as heartbeat:
        try:
            if run.kind in TOOL_JOBS:  # an LR finder's or an export's job, not training
                set_process_threads(run.config)
                TOOL_JOBS[run.kind](store, run, heartbeat)
                return settle(store, run_id, "finished", writer=writer)
            cfg = checked_config(run)
            require_visible_inputs(cfg)
            runtime = prepare_process(cfg)
            splits, pre = load_data(store, cfg, heartbeat)
            stop_if_asked(heartbeat)  # between phases too, not only inside them
            recorder = RunRecorder(store, run_id, CheckpointPolicy.for_run(store.files(run_id), cfg),
                                   heartbeat, cfgmod.to_dict(cfg), list(splits.classes),
                                   pre.to_dict(), run.results)
            recorder.record_data(splits, str(runtime.device))
            resume = resume_point(writer, splits.classes)
            model = starting_model(store, cfg, recorder, len(splits.classes), resume)
            stop_if_asked(heartbeat)
            result = run_stages(model, cfg, splits, pre, runtime, recorder.hooks, resume)
            fault_point("test")
            test_acc = test_best_checkpoint(writer, recorder, splits, pre, runtime,
                                            float(result.epochs_run), result.seconds)
            log.info("finished: best val acc %.4f (stage %d epoch %d), test acc %.4f, %.1f s",
                     result.best_val_acc, result.best_stage, result.best_epoch, test_acc,
                     result.seconds)
            fault_point("settle")
            return settle(store, run_id, "finished", writer=writer)
        except Cancelled:
            log.info("stopped; best checkpoint so far kept")
            return settle(store, run_id, "cancelled", "cancelled by request", writer=writer)
        except (cfgmod.ConfigError, DataError, WeightsError, Diverged, CheckpointError,
                export.ExportError) as exc:
            log.error("%s", exc)
            return settle(store, run_id, "failed", str(exc), writer=writer)
        except Exception as exc:  # anything else: recorded with the traceback in the log
            full = disk_full_at(exc, store)
            if full is not None:
                return settle_disk_full(store, run_id, full, writer=writer)
            if isinstance(exc, StoreUnavailable):  # its message is the one line to show
                log.error("%s", exc)
                return settle(store, run_id, "failed", str(exc), writer=writer)
            log.error("unexpected error:\n%s", traceback.format_exc())
            msg = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
                msg += " — lower the batch size or resolution, or cap the training images"
            return settle(store, run_id, "failed", msg + " (see the run log for details)",
                          writer=writer)


def stop_if_asked(heartbeat: Heartbeat) -> None:
    """Raise Cancelled when a cancel was requested."""
    from core.engine.data import Cancelled

    if heartbeat.should_stop():
        raise Cancelled()


def checked_config(run: Run) -> cfgmod.RunConfig:
    """The run's config, valid under today's rules, or ConfigError."""
    if run.config_error:
        raise cfgmod.ConfigError([run.config_error])
    return cfgmod.check(run.config)


def require_visible_inputs(cfg: cfgmod.RunConfig) -> None:
    """Fail at once, naming this machine, when the run's data folder or weights file is not
    here. The dashboard checked them where it runs; a cluster run reads them on whichever
    node Ray picked, which sees only what is mounted there."""
    from core.engine.data import DataError
    from core.runs.preflight import input_paths

    missing = [str(p) for p in input_paths(cfg) if not p.exists()]
    if missing:
        raise DataError(f"{' and '.join(missing)} not visible on {socket.gethostname()}: a run "
                        f"reads its data on the machine that runs it, so on a cluster put data "
                        f"sets and weights files on a path every node mounts at the same place "
                        f"(e.g. under {ARTIFACTS_ENV}), then resume the run")


def set_process_threads(cfg: cfgmod.RunConfig) -> None:
    """Torch's threads for this worker process: the run's, else one per physical core. Only
    a worker sets them (the dashboard's process is shared by every session)."""
    import torch

    from core.engine.model import physical_cores

    # The worker keeps its launcher's CPU priority. At nice 10 (tried for the white page of
    # issue 12.7, whose cause was a browser race, not CPU), one ordinary process keeping a
    # core busy made its other thread wait at every parallel region, many times slower.
    torch.set_num_threads(cfg.threads or physical_cores())


def prepare_process(cfg: cfgmod.RunConfig) -> Runtime:
    """Threads, the global seed and the device for this worker process."""
    import torch

    from core.engine.model import resolve_device
    from core.engine.train import default_runtime

    set_process_threads(cfg)
    torch.manual_seed(cfg.seed)  # head initialisation and anything else seeded globally
    device = resolve_device(cfg.device)
    log.info("%s on %s, %d threads while loading (each CPU stage chooses its own)",
             " -> ".join(s.trains for s in cfg.stages), device, torch.get_num_threads())
    # This process is the run's alone: each CPU stage sets its threads (0 = from the cores
    # other work leaves free when it starts; core.engine.train.stage_threads).
    return dataclasses.replace(default_runtime(device), cpu_threads=cfg.threads)




def load_data(store: RunStore, cfg: cfgmod.RunConfig,
              heartbeat: Heartbeat) -> tuple[DataSplits, Preprocess]:
    """Decode (or read from the shared cache) the run's images; the preprocessing
    normalises with the statistics the starting weights were trained with."""
    from core.engine.data import Preprocess, load_splits
    from core.engine.model import starting_normalization

    norm = starting_normalization(cfg.weights, cfg.weights_path, donor_checkpoint(store, cfg))
    pre = Preprocess(resolution=cfg.resolution, mean=norm.mean, std=norm.std)
    heartbeat.set_progress(RunProgress(phase="loading data"))
    splits = load_splits(
        cfg.data_source, cfg.data_path, pre, cfg.classes, cfg.val_fraction, cfg.test_fraction,
        cfg.max_train_images, cfg.seed, cache_dir=store.layout.cache,
        on_progress=lambda msg, f: heartbeat.set_progress(
            RunProgress(phase="loading data", message=msg, data_fraction=f)),
        should_stop=heartbeat.should_stop)
    if splits.skipped:
        log.warning("skipped %d unreadable files:\n  %s", len(splits.skipped),
                    "\n  ".join(splits.skipped[:50]))
    log.info("data: %s; %d train / %d val / %d test images, %d classes, %d skipped",
             splits.source, len(splits.train), len(splits.val), len(splits.test),
             len(splits.classes), len(splits.skipped))
    return splits, pre


def resume_point(writer: StoreWriter, classes: list[str]) -> ResumeState | None:
    """Where to pick up: after the last saved epoch, when its checkpoint fits the data.
    Metric rows past that point (or every row, on a fresh start) are dropped, since the
    run writes them again."""
    from core.engine.checkpoints import read_checkpoint
    from core.engine.train import ResumeState

    store, run_id = writer.store, writer.run_id
    last_file = store.files(run_id).last
    last = read_checkpoint(last_file) if last_file.exists() else None
    state = last.training_state if last is not None and last.classes == classes else None
    if last is None or state is None:
        writer.write(store.truncate_metrics, run_id, -1)
        return None
    # Rows of epochs after the checkpoint go, and the next stage's first row, which shares
    # the checkpoint's step.
    writer.write(store.truncate_metrics, run_id, state.step, stage=last.stage)
    log.info("resuming after epoch %d (step %d)", state.global_epoch, state.step)
    return ResumeState(last.state_dict, state)


def starting_model(store: RunStore, cfg: cfgmod.RunConfig, recorder: RunRecorder,
                   num_classes: int, resume: ResumeState | None) -> torch.nn.Module:
    """The model with its starting weights (or the resumed ones), described in the results."""
    from core.engine.model import WeightsError, build_model

    source_ckpt = donor_checkpoint(store, cfg)
    if cfg.weights == "run" and source_ckpt is None:
        raise WeightsError(f"run {cfg.weights_run} has no best checkpoint to start from; "
                           f"pick a finished run")
    start = build_model(num_classes, cfg.weights, cfg.weights_path, source_ckpt)
    model, weights_desc = start.model, start.description
    log.info("starting weights: %s", weights_desc)
    recorder.record(weights=weights_desc)
    if resume is not None:
        stage_start = resumed_stage_start(store.files(recorder.run_id), cfg, resume, model)
        model.load_state_dict(resume.model_state)
        recorder.stage_start = stage_start
    else:
        recorder.start_stage_at(model)
    return model


def resumed_stage_start(files: RunFiles, cfg: cfgmod.RunConfig, resume: ResumeState,
                        starting: torch.nn.Module) -> dict[str, Any]:
    """The weights at the start of the stage a resumed run continues, so its weight
    change equals an uninterrupted run's: the starting weights in stage 1 (rebuilt from the
    same seed), the kept end of the stage before, or (no such file) the resumed weights."""
    from core.engine.checkpoints import read_checkpoint

    first_epoch = 0
    for index, stage in enumerate(cfg.stages, 1):
        if resume.training.global_epoch < first_epoch + stage.epochs:
            break
        first_epoch += stage.epochs
    else:
        index = len(cfg.stages)
    if index == 1:
        return {k: v.detach().clone() for k, v in starting.named_parameters()}
    before = files.stage_end(index - 1)
    names = {k for k, _ in starting.named_parameters()}
    if resume.training.global_epoch > first_epoch and before.exists():
        return {k: v for k, v in read_checkpoint(before).state_dict.items() if k in names}
    return {k: v.detach().clone() for k, v in resume.model_state.items() if k in names}


def test_best_checkpoint(writer: StoreWriter, recorder: RunRecorder,
                         splits: DataSplits, pre: Preprocess, runtime: Runtime,
                         epochs_run: float, seconds: float) -> float:
    """The test set is touched once, at the end, with the best checkpoint. Returns its
    accuracy (0..1), recorded with the confusion matrix."""
    from core.engine.checkpoints import read_checkpoint
    from core.engine.train import Cancelled, confusion_matrix, evaluate

    def on_batch(done: int, total: int) -> None:
        recorder.progress({"phase": "testing", "fraction": 1.0, "data_fraction": done / max(1, total),
                           "message": f"Testing the best checkpoint: {done:,}/{total:,} images"})
        if recorder.heartbeat.should_stop():
            raise Cancelled()

    store, run_id = writer.store, writer.run_id
    recorder.progress({"phase": "testing", "fraction": 1.0, "data_fraction": 0.0,
                       "message": "Loading the best checkpoint"})
    best = read_checkpoint(store.files(run_id).best)
    model = best.build_model().to(runtime.device)
    test_loss, test_acc, preds = evaluate(model, splits.test, pre, runtime, on_batch=on_batch)
    confusion = confusion_matrix(splits.test.labels, preds, len(splits.classes))
    per_class = [row[c] / sum(row) if sum(row) else None for c, row in enumerate(confusion)]
    recorder.record(test_loss=test_loss, per_class_acc=per_class, confusion=confusion,
                    seconds=seconds, test_acc=test_acc)
    # A run killed after this row was written resumes here: it is not written twice.
    if not writer.write(store.metrics, run_id, keys=["test/acc"]):
        writer.log_metrics([(best.stage, epochs_run, 0, "test/acc", test_acc)])
    return test_acc


def settle_disk_full(store: RunStore, run_id: str, path: Path,
                     writer: StoreWriter | None = None) -> str:
    """Remove this run's temp files (freeing what the failed write took) and record the
    run failed with what to do; its last saved epoch stays resumable."""
    from core.runs.jobs import remove_partial_files

    removed = remove_partial_files(store.files(run_id))
    message = disk_full_message(path)
    log.error("%s (removed %d temp file(s))", message, len(removed))
    try:
        return settle(store, run_id, "failed", message, writer=writer)
    except Exception as exc:  # the store itself cannot write: the log keeps the reason
        log.error("could not record the failure in the run store: %s", exc)
        return "failed"


def settle(store: RunStore, run_id: str, status: str, error: str | None = None,
           writer: StoreWriter | None = None) -> str:
    """Record the outcome unless someone else already settled the run (declared it dead,
    force-stopped it); returns the run's final status either way. With `writer`, the
    buffered metric rows go first and a store outage is ridden through (a window of its
    own); if the store stays away, the log keeps the outcome and its status is returned."""
    def finish() -> bool:
        return store.finish_run(run_id, status, error, only_if_running=True)

    try:
        recorded = writer.settle(finish) if writer is not None else finish()
    except StoreError as exc:
        if writer is None:
            raise
        log.error("could not record the run as %s%s in the run store: %s", status,
                  f" ({error})" if error else "", exc)
        return status
    if not recorded:
        run = store.get_run(run_id)
        final = run.status if run else "deleted"
        if final != status:  # equal: our own commit, retried after a lost acknowledgement
            log.warning("run was already settled as %s; not recording %s", final, status)
        return final
    return status


def stop_on_sigterm(store: RunStore, run_id: str) -> None:
    """Settle a run stopped by a signal that no cancel request explains as failed (with the
    reason, resumable), then stop the training loop, whose own settle finds it settled."""
    try:
        if not store.cancel_requested(run_id):
            store.finish_run(run_id, "failed", "stopped by SIGTERM from outside the lab (a "
                             "cluster job stopped, or the node shutting down); it can be "
                             "resumed from its last completed epoch", only_if_running=True)
    finally:
        TERMINATED.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.runs.worker", description=__doc__)
    parser.add_argument("run_id")
    parser.add_argument("--data-dir", default=None, help="run store folder")
    parser.add_argument("--claim", action="store_true",
                        help="move the queued run to running here (a cluster scheduler queued "
                             "this job, not the local queue, which claims before it starts us)")
    parser.add_argument("--log-to-run-folder", action="store_true",
                        help="also write the log to the run's log file (when stdout goes "
                             "elsewhere, e.g. to Ray's job log)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(message)s")
    store = RunStore(args.data_dir)
    if args.log_to_run_folder:
        log_file = store.files(args.run_id).log
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger().addHandler(handler)
    if args.claim and not store.claim_run_now(args.run_id, os.getpid()):
        run = store.get_run(args.run_id)
        log.error("run %s cannot be claimed (status %s); nothing to do",
                  args.run_id, run.status if run else "missing")
        return 2
    run = store.get_run(args.run_id)
    if run is None or run.status != "running":
        log.error("run %s is not claimed for running (status %s); nothing to do",
                  args.run_id, run.status if run else "missing")
        return 2
    if run.pid != os.getpid():
        store.set_pid(args.run_id, os.getpid())
    log.info("worker pid %d on %s (executor %s, job %s)", os.getpid(), socket.gethostname(),
             run.executor or "local", run.job_id or "-")
    if run.executor == "ray":  # a head lost mid-run: record why and stop (executors.ray)
        from core.runs.executors.ray import watch_cluster

        watch_cluster(store, args.run_id)
    # SIGTERM stops the run between batches. Unless the lab asked for it (a cancel request,
    # then a cluster stop after the grace period), it is a fault: a job stopped behind our
    # back, a node shutting down. A signal handler must not touch the store (the main thread
    # may be inside a write), so a thread records that, then stops the loop.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(
        target=stop_on_sigterm, args=(store, args.run_id), daemon=True).start())
    local = run.executor in (None, "local")  # a cluster queues its own jobs
    status = execute_run(store, args.run_id, watch_queue=local)
    if local:
        try:
            dispatch(store)  # start the next queued run, if any
        except Exception as exc:
            log.warning("could not start the next queued run: %s", exc)
    return 0 if status in ("finished", "cancelled") else 1


if __name__ == "__main__":
    sys.exit(main())

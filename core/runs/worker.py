"""A job's `__main__`: claims a run, heartbeats, calls the trainer, records the outcome.

    python -m core.runs.worker RUN_ID [--data-dir DIR]

`execute_run` is also what the command line calls in the foreground, so scripted runs and
dashboard runs go through exactly the same code and land in the same store.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

from core import config as cfgmod
from core.runs.entities import Run, RunProgress
from core.runs.jobs import dispatch
from core.runs.recorder import TERMINATED, CheckpointPolicy, Heartbeat, RunRecorder
from core.runs.store import RunStore

if TYPE_CHECKING:
    import torch

    from core.engine.data import DataSplits, Preprocess
    from core.engine.train import ResumeState, Runtime

log = logging.getLogger("finetune_lab.worker")


def execute_run(store: RunStore, run_id: str,
                on_progress: Callable[[RunProgress], None] | None = None) -> str:
    """Run the (already claimed, status running) run to its end. Returns the final status.
    Every outcome is recorded in the store; exceptions do not escape."""
    from core.engine.data import DataError
    from core.engine.model import WeightsError
    from core.engine.train import Cancelled, run_stages

    run = store.get_run(run_id)
    if run is None:
        raise SystemExit(f"run {run_id} not found in {store.root}")
    with Heartbeat(store, run_id, on_progress=on_progress) as heartbeat:
        try:
            cfg = checked_config(run)
            runtime = prepare_process(cfg)
            splits, pre = load_data(store, cfg, heartbeat)
            recorder = RunRecorder(store, run_id, CheckpointPolicy.for_run(store.files(run_id), cfg),
                                   heartbeat, cfgmod.to_dict(cfg), list(splits.classes),
                                   pre.to_dict(), run.results)
            recorder.record_data(splits, str(runtime.device))
            resume = resume_point(store, run_id, splits.classes)
            model = starting_model(store, cfg, recorder, len(splits.classes), resume)
            result = run_stages(model, cfg, splits, pre, runtime, recorder.hooks, resume)
            test_acc = test_best_checkpoint(store, run_id, recorder, splits, pre, runtime,
                                            float(result.epochs_run), result.seconds)
            log.info("finished: best val acc %.4f (stage %d epoch %d), test acc %.4f, %.1f s",
                     result.best_val_acc, result.best_stage, result.best_epoch, test_acc,
                     result.seconds)
            return settle(store, run_id, "finished")
        except Cancelled:
            log.info("stopped; best checkpoint so far kept")
            return settle(store, run_id, "cancelled", "cancelled by request")
        except (cfgmod.ConfigError, DataError, WeightsError) as exc:
            log.error("%s", exc)
            return settle(store, run_id, "failed", str(exc))
        except Exception as exc:  # anything else: recorded with the traceback in the log
            log.error("unexpected error:\n%s", traceback.format_exc())
            msg = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
                msg += " — lower the batch size or resolution, or cap the training images"
            return settle(store, run_id, "failed", msg + " (see the run log for details)")


def checked_config(run: Run) -> cfgmod.RunConfig:
    """The run's config, valid under today's rules, or ConfigError."""
    if run.config_error:
        raise cfgmod.ConfigError([run.config_error])
    return cfgmod.check(run.config)


def prepare_process(cfg: cfgmod.RunConfig) -> Runtime:
    """Threads, the global seed and the device for this worker process."""
    import torch

    from core.engine.model import physical_cores, resolve_device
    from core.engine.train import default_runtime

    torch.set_num_threads(cfg.threads or physical_cores())
    torch.manual_seed(cfg.seed)  # head initialisation and anything else seeded globally
    device = resolve_device(cfg.device)
    log.info("%s on %s", " -> ".join(s.trains for s in cfg.stages), device)
    return default_runtime(device)


def load_data(store: RunStore, cfg: cfgmod.RunConfig,
              heartbeat: Heartbeat) -> tuple[DataSplits, Preprocess]:
    """Decode (or read from the shared cache) the run's images."""
    from core.engine.data import Preprocess, load_splits

    pre = Preprocess(resolution=cfg.resolution)
    heartbeat.set_progress(RunProgress(phase="loading data"))
    splits = load_splits(
        cfg.data_source, cfg.data_path, pre, cfg.classes, cfg.val_fraction, cfg.test_fraction,
        cfg.max_train_images, cfg.seed, cache_dir=store.layout.cache,
        on_progress=lambda msg, f: heartbeat.set_progress(
            RunProgress(phase="loading data", message=msg, data_fraction=f)))
    if splits.skipped:
        log.warning("skipped %d unreadable files:\n  %s", len(splits.skipped),
                    "\n  ".join(splits.skipped[:50]))
    log.info("data: %s; %d train / %d val / %d test images, %d classes, %d skipped",
             splits.source, len(splits.train), len(splits.val), len(splits.test),
             len(splits.classes), len(splits.skipped))
    return splits, pre


def resume_point(store: RunStore, run_id: str, classes: list[str]) -> ResumeState | None:
    """Where to pick up: after the last saved epoch, when its checkpoint fits the data.
    Metric rows past that point (or every row, on a fresh start) are dropped, since the
    run writes them again."""
    from core.engine.checkpoints import read_checkpoint
    from core.engine.train import ResumeState

    last_file = store.files(run_id).last
    last = read_checkpoint(last_file) if last_file.exists() else None
    state = last.training_state if last is not None and last.classes == classes else None
    if last is None or state is None:
        store.truncate_metrics(run_id, -1)
        return None
    store.truncate_metrics(run_id, state.step)
    log.info("resuming after epoch %d (step %d)", state.global_epoch, state.step)
    return ResumeState(model_state=last.state_dict, global_epoch=state.global_epoch,
                       step=state.step, optimizer=state.optimizer, scheduler=state.scheduler,
                       rng=state.rng, best_val_acc=state.best_val_acc,
                       best_stage=state.best_stage, best_epoch=state.best_epoch)


def starting_model(store: RunStore, cfg: cfgmod.RunConfig, recorder: RunRecorder,
                   num_classes: int, resume: ResumeState | None) -> torch.nn.Module:
    """The model with its starting weights (or the resumed ones), described in the results."""
    from core.engine.model import WeightsError, build_model

    source_ckpt = None
    if cfg.weights == "run":
        other = store.get_run(cfg.weights_run)
        if other is None or not other.best_checkpoint:
            raise WeightsError(f"run {cfg.weights_run} has no best checkpoint to start from; "
                               f"pick a finished run")
        source_ckpt = other.best_checkpoint
    model, weights_desc = build_model(num_classes, cfg.weights, cfg.weights_path, source_ckpt)
    log.info("starting weights: %s", weights_desc)
    recorder.record(weights=weights_desc)
    if resume is not None:
        model.load_state_dict(resume.model_state)
    recorder.start_stage_at(model)
    return model


def test_best_checkpoint(store: RunStore, run_id: str, recorder: RunRecorder,
                         splits: DataSplits, pre: Preprocess, runtime: Runtime,
                         epochs_run: float, seconds: float) -> float:
    """The test set is touched once, at the end, with the best checkpoint. Returns its
    accuracy (0..1), recorded with the confusion matrix."""
    from core.engine.checkpoints import read_checkpoint
    from core.engine.train import confusion_matrix, evaluate

    recorder.progress({"phase": "testing", "fraction": 1.0})
    best = read_checkpoint(store.files(run_id).best)
    model = best.build_model().to(runtime.device)
    test_loss, test_acc, preds = evaluate(model, splits.test, pre, runtime)
    confusion = confusion_matrix(splits.test.labels, preds, len(splits.classes))
    per_class = [row[c] / sum(row) if sum(row) else None for c, row in enumerate(confusion)]
    recorder.record(test_loss=test_loss, per_class_acc=per_class, confusion=confusion,
                    seconds=seconds, test_acc=test_acc)
    store.log_metrics(run_id, [(best.stage, epochs_run, 0, "test/acc", test_acc)])
    return test_acc


def settle(store: RunStore, run_id: str, status: str, error: str | None = None) -> str:
    """Record the outcome unless someone else already settled the run (declared it dead,
    force-stopped it); returns the run's final status either way."""
    if not store.finish_run(run_id, status, error, only_if_running=True):
        run = store.get_run(run_id)
        final = run.status if run else "deleted"
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
    # SIGTERM stops the run between batches. Unless the lab asked for it (a cancel request,
    # then a cluster stop after the grace period), it is a fault: a job stopped behind our
    # back, a node shutting down. A signal handler must not touch the store (the main thread
    # may be inside a write), so a thread records that, then stops the loop.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(
        target=stop_on_sigterm, args=(store, args.run_id), daemon=True).start())
    status = execute_run(store, args.run_id)
    if run.executor in (None, "local"):  # a cluster queues its own jobs
        try:
            dispatch(store)  # start the next queued run, if any
        except Exception as exc:
            log.warning("could not start the next queued run: %s", exc)
    return 0 if status in ("finished", "cancelled") else 1


if __name__ == "__main__":
    sys.exit(main())

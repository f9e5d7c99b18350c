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
import sys
import threading
import time
import traceback
from typing import Any, Callable

from core import config as cfgmod
from core.runs.jobs import HEARTBEAT_S, dispatch
from core.runs.store import RunStore

log = logging.getLogger("finetune_lab.worker")
# Set by SIGTERM. A signal handler must not touch the store (the main thread may be inside
# a write transaction), so it only sets this; the training loop stops at the next batch.
TERMINATED = threading.Event()
CANCEL_POLL_S = 0.2  # how often the training loop asks the store about cancellation, seconds


class Heartbeat:
    """A thread that reports liveness and the latest progress every HEARTBEAT_S seconds and
    turns a cancel request (from the store, or SIGTERM) into an Event the trainer polls
    between batches, so polling costs the training loop nothing."""

    def __init__(self, store: RunStore, run_id: str, interval_s: float = HEARTBEAT_S):
        self.store, self.run_id, self.interval_s = store, run_id, interval_s
        self.cancel = threading.Event()
        self._progress: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._last_poll = 0.0
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
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

    def set_progress(self, progress: dict[str, Any]) -> None:
        with self._lock:
            self._progress = {**progress, "updated_at": time.time()}

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


def execute_run(store: RunStore, run_id: str,
                on_progress: Callable[[dict[str, Any]], None] | None = None) -> str:
    """Run the (already claimed, status running) run to its end. Returns the final status.
    Every outcome is recorded in the store; exceptions do not escape."""
    import torch

    from core.engine.checkpoints import BEST_NAME, LAST_NAME, read_checkpoint, save_checkpoint
    from core.engine.data import DataError, Preprocess, load_splits
    from core.engine.model import WeightsError, build_model, physical_cores, resolve_device
    from core.engine.train import (Cancelled, EpochEnd, ResumeState, TrainHooks, confusion_matrix,
                        default_runtime, evaluate, run_stages)

    run = store.get_run(run_id)
    if run is None:
        raise SystemExit(f"run {run_id} not found in {store.root}")
    run_dir = store.run_dir(run_id)
    best_path, last_path = run_dir / BEST_NAME, run_dir / LAST_NAME

    with Heartbeat(store, run_id) as hb:
        def progress(p: dict[str, Any]) -> None:
            hb.set_progress(p)
            if on_progress:
                on_progress(p)

        try:
            cfg = cfgmod.from_dict(run.config)
            torch.set_num_threads(cfg.threads or physical_cores())
            torch.manual_seed(cfg.seed)  # head initialisation and anything else seeded globally
            device = resolve_device(cfg.device)
            runtime = default_runtime(device)
            pre = Preprocess(resolution=cfg.resolution)
            log.info("run %s: %s on %s", run_id, " -> ".join(s.trains for s in cfg.stages), device)

            progress({"phase": "loading data", "fraction": 0.0})
            splits = load_splits(
                cfg.data_source, cfg.data_path, pre, cfg.classes, cfg.val_fraction,
                cfg.test_fraction, cfg.max_train_images, cfg.seed, cache_dir=store.root / "cache",
                on_progress=lambda msg, f: progress({"phase": "loading data", "message": msg,
                                                     "fraction": 0.0, "data_fraction": f}))
            if splits.skipped:
                log.warning("skipped %d unreadable files:\n  %s", len(splits.skipped),
                            "\n  ".join(splits.skipped[:50]))
            store.merge_results(run_id, {
                "classes": splits.classes, "data": splits.source, "skipped_files": len(splits.skipped),
                "skipped_examples": splits.skipped[:20],
                "sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
                "device": str(device)})
            log.info("data: %s; %d train / %d val / %d test images, %d classes, %d skipped",
                     splits.source, len(splits.train), len(splits.val), len(splits.test),
                     len(splits.classes), len(splits.skipped))

            resume = None
            if last_path.exists():
                last = read_checkpoint(last_path)
                ts = last.training_state
                if ts is not None and last.classes == splits.classes:
                    resume = ResumeState(model_state=last.state_dict, global_epoch=ts["global_epoch"],
                                         step=ts["step"], optimizer=ts["optimizer"],
                                         scheduler=ts["scheduler"], rng=ts["rng"],
                                         best_val_acc=ts["best_val_acc"], best_stage=ts["best_stage"],
                                         best_epoch=ts["best_epoch"])
                    store.truncate_metrics(run_id, ts["step"])
                    log.info("resuming after epoch %d (step %d)", ts["global_epoch"], ts["step"])

            if resume is None:
                # A fresh start (or a resume with no completed epoch): rows from an earlier
                # attempt would duplicate the new ones.
                store.truncate_metrics(run_id, -1)

            source_ckpt = None
            if cfg.weights == "run":
                other = store.get_run(cfg.weights_run)
                if other is None or not other.best_checkpoint:
                    raise WeightsError(f"run {cfg.weights_run} has no best checkpoint to start from; "
                                       f"pick a finished run")
                source_ckpt = other.best_checkpoint
            model, weights_desc = build_model(len(splits.classes), cfg.weights, cfg.weights_path,
                                              source_ckpt)
            log.info("starting weights: %s", weights_desc)
            config_dict = cfgmod.to_dict(cfg)
            if resume is not None:
                model.load_state_dict(resume.model_state)
            # Weights at the start of the current stage, to measure how far each layer group
            # moved in it (per-stage attribution). After a resume mid-stage they are the
            # resumed weights, so that stage's movement counts from the resume point.
            stage_start = {k: v.detach().clone() for k, v in model.named_parameters()}
            weight_change: list[dict[str, Any]] = list(
                (store.get_run(run_id).results or {}).get("weight_change", []))  # type: ignore[union-attr]

            def on_epoch_end(end: EpochEnd) -> None:
                metrics = {"val_acc": end.val_acc, "val_loss": end.val_loss,
                           "train_loss": end.train.loss, "train_acc": end.train.acc}
                if end.is_best:
                    save_checkpoint(best_path, end.model, config_dict, splits.classes, pre.to_dict(),
                                    end.stage, end.epoch, metrics)
                    store.set_best(run_id, end.val_acc, end.stage, end.epoch, str(best_path))
                # Where a resume picks up: store.requeue drops rows past this step. Recorded
                # before last.pt is written: killed in between, requeue keeps a few rows too
                # many and the worker's own truncation (at ts["step"]) removes them; the
                # other order could drop the rows of an epoch that last.pt does hold.
                store.merge_results(run_id, {"last_step": end.step})
                # "last" carries optimizer/scheduler/RNG state: resume after this epoch.
                save_checkpoint(last_path, end.model, config_dict, splits.classes, pre.to_dict(),
                                end.stage, end.epoch, metrics, training_state=end.training_state)
                if end.stage == 1 and end.epoch == cfg.stages[0].epochs and len(cfg.stages) > 1:
                    # End of stage 1: kept for "before and after" comparisons.
                    save_checkpoint(run_dir / "stage1.pt", end.model, config_dict, splits.classes,
                                    pre.to_dict(), end.stage, end.epoch, metrics)
                if end.epoch == cfg.stages[end.stage - 1].epochs:
                    nonlocal stage_start
                    weight_change[:] = [w for w in weight_change if w["stage"] != end.stage]
                    weight_change.append({"stage": end.stage,
                                          "groups": relative_weight_change(end.model, stage_start)})
                    store.merge_results(run_id, {"weight_change": weight_change})
                    stage_start = {k: v.detach().clone() for k, v in end.model.named_parameters()}
                log.info("stage %d epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f s",
                         end.stage, end.epoch, end.train.loss, end.train.acc, end.val_loss,
                         end.val_acc, end.train.seconds)

            hooks = TrainHooks(on_metrics=lambda rows: store.log_metrics(run_id, rows),
                               on_progress=progress, should_stop=hb.should_stop,
                               on_epoch_end=on_epoch_end)
            result = run_stages(model, cfg, splits, pre, runtime, hooks, resume)

            # The test set is touched once, at the end, with the best checkpoint.
            progress({"phase": "testing", "fraction": 1.0})
            best = read_checkpoint(best_path)
            best_model = best.build_model()
            test_loss, test_acc, preds = evaluate(best_model.to(device), splits.test, pre, runtime)
            confusion = confusion_matrix(splits.test.labels, preds, len(splits.classes))
            per_class = [row[c] / sum(row) if sum(row) else None for c, row in enumerate(confusion)]
            store.set_results(run_id, test_acc, {
                "test_loss": test_loss, "per_class_acc": per_class, "confusion": confusion,
                "seconds": result.seconds, "weights": weights_desc,
            })
            store.log_metrics(run_id, [(best.stage, float(result.epochs_run), 0, "test/acc", test_acc)])
            log.info("finished: best val acc %.4f (stage %d epoch %d), test acc %.4f, %.1f s",
                     result.best_val_acc, result.best_stage, result.best_epoch, test_acc, result.seconds)
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


def settle(store: RunStore, run_id: str, status: str, error: str | None = None) -> str:
    """Record the outcome unless someone else already settled the run (declared it dead,
    force-stopped it); returns the run's final status either way."""
    if not store.finish_run(run_id, status, error, only_if_running=True):
        run = store.get_run(run_id)
        final = run.status if run else "deleted"
        log.warning("run was already settled as %s; not recording %s", final, status)
        return final
    return status


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.runs.worker", description=__doc__)
    parser.add_argument("run_id")
    parser.add_argument("--data-dir", default=None, help="run store folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(message)s")
    store = RunStore(args.data_dir)
    run = store.get_run(args.run_id)
    if run is None or run.status != "running":
        log.error("run %s is not claimed for running (status %s); nothing to do",
                  args.run_id, run.status if run else "missing")
        return 2
    if run.pid != os.getpid():
        store.set_pid(args.run_id, os.getpid())
    # SIGTERM (the cancel fallback) becomes a cancel request honoured between batches.
    signal.signal(signal.SIGTERM, lambda *_: TERMINATED.set())
    status = execute_run(store, args.run_id)
    try:
        dispatch(store)  # start the next queued run, if any
    except Exception as exc:
        log.warning("could not start the next queued run: %s", exc)
    return 0 if status in ("finished", "cancelled") else 1


if __name__ == "__main__":
    sys.exit(main())

"""Background jobs through real worker processes: queue, finish, cancel, kill, resume."""

import os
import signal
import time

import pytest

from core import config as cfgmod
from core.engine.checkpoints import read_checkpoint
from core.runs import jobs
from core.runs.preflight import PreflightError
from tests.conftest import make_image_folder, tiny_config, wait_for


def _long_config(tiny_folder, epochs=200):
    """Enough epochs that the run is still going when the test acts on it."""
    cfg = tiny_config(tiny_folder, batch_size=4)
    return cfgmod.with_stage(cfg, 0, epochs=epochs)


def _status(store, run_id):
    jobs.reconcile(store)
    return store.get_run(run_id).status


def test_two_stage_run_goes_queued_running_finished(store, tiny_folder):
    run = jobs.submit(store, tiny_config(tiny_folder), name="bg")
    assert run.status in ("queued", "running")
    seen = set()

    def done():
        r = store.get_run(run.id)
        seen.add(r.status)
        return r.status in ("finished", "failed")

    wait_for(done, 120, "the run to finish")
    final = store.get_run(run.id)
    assert final.status == "finished", (final.error, jobs.log_tail(store, run.id))
    assert "running" in seen or final.started_at is not None
    stages = {m.stage for m in store.metrics(run.id, keys=["val/acc"])}
    assert stages == {1, 2}
    assert read_checkpoint(final.best_checkpoint).classes == ["blue", "green", "red"]
    assert "finished: best val acc" in jobs.log_tail(store, run.id)


def test_queue_respects_the_concurrency_limit(store, tiny_folder, monkeypatch):
    monkeypatch.setenv(jobs.MAX_JOBS_ENV, "1")
    a = jobs.submit(store, tiny_config(tiny_folder), name="a")
    b = jobs.submit(store, tiny_config(tiny_folder), name="b")
    max_running = 0

    def both_done():
        nonlocal max_running
        runs = [store.get_run(a.id), store.get_run(b.id)]
        max_running = max(max_running, sum(r.status == "running" for r in runs))
        return all(r.status in ("finished", "failed") for r in runs)

    # b starts only when a's worker ends and dispatches it: no UI involved.
    wait_for(both_done, 180, "both queued runs to finish")
    assert max_running == 1
    assert store.get_run(a.id).status == store.get_run(b.id).status == "finished"


def test_cancel_stops_a_running_run_and_keeps_its_best_checkpoint(store, tiny_folder):
    run = jobs.submit(store, _long_config(tiny_folder))
    wait_for(lambda: store.get_run(run.id).best_checkpoint, 120, "a first best checkpoint")
    t0 = time.monotonic()
    jobs.cancel(store, run.id)
    wait_for(lambda: _status(store, run.id) != "running", 60, "the run to stop")
    latency_s = time.monotonic() - t0
    final = store.get_run(run.id)
    assert final.status == "cancelled", final.error
    assert latency_s < 30  # generous bound for a loaded CI machine; figure in the README
    ckpt = read_checkpoint(final.best_checkpoint)
    assert ckpt.build_model() is not None


def test_cancelling_a_queued_run_is_immediate(store, tiny_folder):
    run = jobs.submit(store, tiny_config(tiny_folder), start=False)
    assert jobs.cancel(store, run.id).status == "cancelled"


def test_killed_worker_is_reported_failed_and_can_resume(store, tiny_folder):
    cfg = _long_config(tiny_folder, epochs=3)
    run = jobs.submit(store, cfg)
    last = store.run_dir(run.id) / "last.pt"
    wait_for(lambda: store.get_run(run.id).best_checkpoint and last.exists(), 120,
             "a first completed epoch")
    pid = store.get_run(run.id).pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _status(store, run.id) == "failed", 30, "the dead worker to be noticed")
    failed = store.get_run(run.id)
    assert "exited without reporting" in failed.error
    assert not list(store.run_dir(run.id).glob(".*.tmp")), "half-written files left behind"
    read_checkpoint(failed.best_checkpoint)  # intact
    epochs_before = {m.epoch for m in store.metrics(run.id, keys=["val/acc"])}

    last_step = store.get_run(run.id).last_step
    assert store.requeue(run.id)  # rows past the resumable point go in the same transaction
    assert max(m.step for m in store.metrics(run.id)) <= last_step
    jobs.resume(store, run.id)
    wait_for(lambda: _status(store, run.id) in ("finished", "failed"), 180, "the resumed run")
    final = store.get_run(run.id)
    assert final.status == "finished", (final.error, jobs.log_tail(store, run.id))
    val_rows = store.metrics(run.id, keys=["val/acc"])
    epochs = [m.epoch for m in val_rows]
    assert epochs == sorted(set(epochs)), "an epoch was logged twice"
    assert set(epochs) == {1.0, 2.0, 3.0, 4.0}  # 3 epochs of stage 1 + 1 of stage 2
    assert epochs_before <= set(epochs)
    assert "resuming after epoch" in jobs.log_tail(store, run.id)


def test_bad_data_fails_at_submit_not_in_the_worker(store, tmp_path, tiny_folder):
    one_class = make_image_folder(tmp_path / "one", per_class=3, classes=("only",), split=False)
    for path, needle in [(tmp_path / "missing", "does not exist"), (one_class, "at least two")]:
        with pytest.raises(PreflightError, match=needle):
            jobs.submit(store, tiny_config(path))
    mismatch = make_image_folder(tmp_path / "mm", per_class=3)
    (mismatch / "test" / "red").rename(mismatch / "test" / "purple")
    with pytest.raises(PreflightError, match="different classes"):
        jobs.submit(store, tiny_config(mismatch))
    empty = make_image_folder(tmp_path / "empty", per_class=3, split=False)
    (empty / "void").mkdir()
    with pytest.raises(PreflightError, match="has no images"):
        jobs.submit(store, tiny_config(empty))
    assert store.list_runs() == []  # nothing was queued


def test_corrupt_and_non_image_files_are_skipped_and_counted(store, tmp_path):
    from core.runs.worker import execute_run

    root = make_image_folder(tmp_path / "dirty", per_class=6)
    (root / "train" / "red" / "notes.txt").write_text("not an image")
    (root / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    run = store.create_run(tiny_config(root))
    store.claim_run_now(run.id, os.getpid())
    assert execute_run(store, run.id) == "finished"
    results = store.get_run(run.id).results
    assert results.skipped_files == 2
    assert any("broken.jpg" in s for s in results.skipped_examples)


def test_start_from_another_runs_checkpoint_with_new_classes(store, finished_run, tmp_path):
    from core.runs.worker import execute_run

    src_store, src = finished_run
    other = make_image_folder(tmp_path / "two", per_class=6, classes=("cyan", "pink"))
    # A run in another store cannot be named by id; use its checkpoint as a weights file.
    cfg = tiny_config(other, weights="file", weights_path=src.best_checkpoint)
    run = store.create_run(cfg)
    store.claim_run_now(run.id, os.getpid())
    assert execute_run(store, run.id) == "finished", store.get_run(run.id).error
    assert "new head" in store.get_run(run.id).results.weights


def test_force_stop_ends_a_run_that_ignores_cancel(store, tiny_folder):
    run = jobs.submit(store, _long_config(tiny_folder))
    wait_for(lambda: store.get_run(run.id).progress.phase == "training", 120, "training")
    pid = store.get_run(run.id).pid
    stopped = jobs.kill(store, run.id)
    assert stopped.status == "cancelled" and "force-stopped" in stopped.error
    wait_for(lambda: not jobs.pid_is_worker(pid, stopped.pid_start), 30, "the process to end")


def test_a_dead_workers_queue_moves_on_with_no_page_open(store, tiny_folder, monkeypatch):
    """Issue 12.1: an overnight queue must not stall at its first crash. No page and no
    call of ours advances it: the supervisor the first submit started does."""
    from core.runs import supervisor

    monkeypatch.setenv(jobs.MAX_JOBS_ENV, "1")
    first = jobs.submit(store, _long_config(tiny_folder))
    second = jobs.submit(store, tiny_config(tiny_folder))
    third = jobs.submit(store, tiny_config(tiny_folder))
    wait_for(lambda: store.get_run(first.id).pid, 60, "the first worker")
    wait_for(lambda: supervisor.is_running(store), 30, "the supervisor")
    assert store.get_run(second.id).status == store.get_run(third.id).status == "queued"
    os.kill(store.get_run(first.id).pid, signal.SIGKILL)
    t0 = time.monotonic()
    # Only reads from here on: store.get_run starts and settles nothing.
    wait_for(lambda: store.get_run(second.id).status != "queued", 30, "the next run to start")
    assert time.monotonic() - t0 < 15
    dead = store.get_run(first.id)
    assert dead.status == "failed" and "exited without reporting" in dead.error
    wait_for(lambda: store.get_run(third.id).status == "finished", 240, "the queue to drain")
    assert store.get_run(second.id).status == "finished"
    # Nothing left to do: the supervisor goes away by itself.
    wait_for(lambda: not supervisor.is_running(store), 30, "the supervisor to exit")


def test_a_stale_run_after_a_restart_is_settled_once_something_looks(store, monkeypatch):
    """After a machine restart no supervisor runs and no submit comes: the sidebar's
    ensure_watched settles the dead run and, while runs are active, starts a supervisor."""
    from core.config import RunConfig
    from core.runs import supervisor

    monkeypatch.setenv(jobs.MAX_JOBS_ENV, "1")
    dead = store.create_run(RunConfig())
    store.claim_run_now(dead.id, pid=2**22 + 12345)  # a pid that no longer exists
    assert not supervisor.is_running(store)
    assert jobs.ensure_watched(store)
    assert store.get_run(dead.id).status == "failed"
    assert not jobs.ensure_watched(store)  # nothing active: nothing started
    # A foreground run (this process) holds the one slot; one run waits behind it.
    holder = store.create_run(RunConfig())
    store.claim_run_now(holder.id, os.getpid())
    waiting = store.create_run(RunConfig())
    assert jobs.ensure_watched(store)
    wait_for(lambda: supervisor.is_running(store), 30, "a supervisor")
    assert not jobs.ensure_watched(store)  # one watches: nothing more
    assert store.get_run(waiting.id).status == "queued"
    jobs.cancel(store, waiting.id)
    store.finish_run(holder.id, "cancelled")
    wait_for(lambda: not supervisor.is_running(store), 30, "the supervisor to exit")


def test_the_sidebar_read_starts_nothing(store, tiny_folder):
    run = jobs.submit(store, tiny_config(tiny_folder), start=False)
    first = jobs.summary(store)
    assert [r.id for r in first.queued] == [run.id] and first.running == []
    assert store.get_run(run.id).status == "queued" and store.get_run(run.id).pid is None
    # The named action is what starts it.
    assert jobs.dispatch(store) == [run.id]
    assert [r.id for r in jobs.summary(store).running] == [run.id]
    wait_for(lambda: store.get_run(run.id).status == "finished", 120, "the run")


def test_a_run_records_where_it_ran(store, tiny_folder):
    import socket

    run = jobs.submit(store, tiny_config(tiny_folder))
    wait_for(lambda: store.get_run(run.id).status == "finished", 120, "the run")
    final = store.get_run(run.id)
    assert (final.executor, final.host) == ("local", socket.gethostname())
    assert final.job_id == str(final.pid)


def test_an_unknown_executor_is_refused_before_a_run_exists(store, tiny_folder, monkeypatch):
    monkeypatch.setenv(jobs.EXECUTOR_ENV, "slurm")
    with pytest.raises(PreflightError, match="FINETUNE_LAB_EXECUTOR must be one of local, ray"):
        jobs.submit(store, tiny_config(tiny_folder))
    monkeypatch.setenv(jobs.EXECUTOR_ENV, "ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(PreflightError, match="RAY_ADDRESS"):
        jobs.submit(store, tiny_config(tiny_folder))
    assert store.list_runs() == []


def test_a_run_whose_stored_config_no_longer_loads_fails_with_the_reason(store, tiny_folder):
    import json
    import sqlite3

    from core.runs.worker import execute_run

    run = store.create_run(tiny_config(tiny_folder))
    stored = {**cfgmod.to_dict(run.config), "mixup": 0.2}  # a field this version does not know
    with sqlite3.connect(store.db_path) as con:
        con.execute("UPDATE runs SET config=? WHERE id=?", (json.dumps(stored), run.id))
    assert store.claim_run_now(run.id, os.getpid())
    assert execute_run(store, run.id) == "failed"
    assert "mixup" in store.get_run(run.id).error

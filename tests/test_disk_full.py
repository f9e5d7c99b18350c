"""A full disk, on a real small filesystem (a 20 MB tmpfs, mounted as root; skipped
elsewhere, failed in CI): the worker records "disk full at <path>: free space and resume",
leaves no temp files, and the run resumes once there is room. Before a run starts, a data set and
checkpoints that cannot fit are refused with the figures."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from core.runs import disk
from core.runs.store import RunStore, StoreError
from core.runs.worker import disk_full_at, execute_run
from tests.conftest import tiny_config


def _unavailable(why: str) -> None:
    """Skip where no tmpfs can be mounted, except in CI (env CI set), which runs as root
    and must test a full disk: there it fails, like the PostgreSQL and Ray tests."""
    if os.environ.get("CI"):
        pytest.fail(f"the full-disk tests need a tmpfs in CI: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MB tmpfs at tmp_path/disk, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        _unavailable("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        _unavailable(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_run_that_fills_the_disk_fails_with_the_reason_and_resumes(small_disk, tiny_folder):
    store = RunStore(small_disk / "runs")
    run = store.create_run(tiny_config(tiny_folder))
    assert store.claim_run_now(run.id, os.getpid())
    # A ResNet-18 checkpoint (~45 MB) cannot fit on 20 MB: the first best.pt write fails.
    assert execute_run(store, run.id) == "failed"
    failed = store.get_run(run.id)
    assert failed.error == f"disk full at {store.files(run.id).best}: free space and resume"
    assert not store.files(run.id).temp_files()
    assert not list(store.layout.cache.glob(".*.tmp"))
    # Free space (grow the filesystem), resume: it finishes.
    subprocess.run(["mount", "-o", "remount,size=400m", str(small_disk)], check=True)
    assert store.requeue(run.id)
    assert store.claim_run_now(run.id, os.getpid())
    assert execute_run(store, run.id) == "finished", store.get_run(run.id).error


def test_the_store_on_a_full_disk_is_recognised(small_disk):
    store = RunStore(small_disk / "runs")
    run = store.create_run(tiny_config(Path("/nonexistent")))
    filler = small_disk / "filler"
    with open(filler, "wb") as f:  # take every free byte
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    # The store's own wrapper, or SQLite's error when opening the connection already fails.
    with pytest.raises((StoreError, sqlite3.OperationalError)) as caught:
        for i in range(200):  # the WAL grows until it finds no room
            store.log_metrics(run.id, [(1, float(i), i, "x" * 200, 0.5)] * 50)
    assert disk_full_at(caught.value, store) == store.db_path


def test_a_run_that_cannot_fit_is_refused_before_it_starts(small_disk, tiny_folder):
    from dataclasses import replace

    cfg = replace(tiny_config(tiny_folder), resolution=224)
    problem = disk.space_problem(cfg, images=200_000, data_dir=small_disk)
    assert problem is not None
    assert "MB free" in problem and "needs about" in problem and str(small_disk) in problem
    assert disk.space_problem(cfg, images=10, data_dir=small_disk / "..") is None


def test_preflight_refuses_a_run_that_cannot_fit(small_disk, tiny_folder, monkeypatch):
    from core.runs.preflight import PreflightError, preflight

    store = RunStore(small_disk / "runs")
    with pytest.raises(PreflightError, match="disk"):
        preflight(tiny_config(tiny_folder), store)


def test_a_full_disk_during_a_database_write_says_disk_full_not_out_of_memory(
        small_disk, tiny_folder, tmp_path):
    """Issue 22.3: the store's disk fills after a few metric rows (the checkpoints are on
    another disk, so a database write is what fails). The run reads the same words as a
    full disk at a checkpoint, once there is room to record them, not "killed, out of
    memory", and it can be resumed."""
    import signal

    from core import config as cfgmod
    from core.runs import supervisor
    from core.runs.executors.base import worker_command
    from tests.conftest import wait_for

    store = RunStore(small_disk / "runs", artifacts=tmp_path / "artifacts")
    cfg = cfgmod.with_stage(tiny_config(tiny_folder, batch_size=4), 0, epochs=200)
    run = store.create_run(cfg)
    assert store.claim_run_now(run.id, os.getpid())
    log_path = store.files(run.id).log
    with open(log_path, "ab") as log:
        worker = subprocess.Popen(worker_command(run.id, store), stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True,
                                  cwd=Path(__file__).resolve().parent.parent,
                                  env={**os.environ, **store.environment()})
    filler = small_disk / "filler"
    try:
        wait_for(lambda: len(store.metrics(run.id)) >= 5, 300, "5 metric rows")
        with open(filler, "wb") as f:  # take every free byte
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        wait_for(lambda: "disk full at" in log_path.read_text(errors="replace"), 300,
                 "the worker to meet the full disk")
        filler.unlink()  # free space: the outcome can be recorded now
        assert worker.wait(timeout=300) == 1
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        filler.unlink(missing_ok=True)
    failed = store.get_run(run.id)
    assert (failed.status, failed.error) == (
        "failed", f"disk full at {store.db_path}: free space and resume")
    assert store.requeue(run.id)
    # The supervisor the worker kept alive leaves once nothing is active.
    wait_for(lambda: not supervisor.is_running(store), 300, "the supervisor to exit")

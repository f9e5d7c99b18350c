"""Store outages with real parts (issue 17): PostgreSQL stopped while a real worker process
trains and while the queue supervisor runs. The worker rides through a short outage (the run
finishes with every metric row stored once), fails a longer one with one line naming the
store and the cause (and the run resumes), and the supervisor survives both.

These stop and start the machine's PostgreSQL cluster (`pg_ctlcluster`), so they run only
under scripts/with_services.sh, which holds the machine-wide services lock; every test starts
the cluster again in a `finally`, since later tests need it. Without PostgreSQL they skip,
and fail in CI (tests/conftest.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from core.runs import supervisor
from core.runs.executors.base import worker_command
from core.runs.store import RunStore, StoreError
from core.runs.worker import execute_run
from core.settings import STORE_RETRY_ENV
from tests.conftest import postgres_database, postgres_server, tiny_config, wait_for

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 600  # a loaded 2-core machine: generous, polled


def _cluster() -> list[str]:
    """The PostgreSQL cluster the test server runs as, e.g. ["15", "main"]."""
    postgres_server()  # skip (fail in CI) without one
    out = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        pytest.skip("no PostgreSQL cluster to stop here (pg_lsclusters)")
    return out.stdout.split()[:2]


def _pg(action: str) -> None:
    subprocess.run(["pg_ctlcluster", *_cluster(), action, *(["-m", "fast"] if action == "stop"
                                                            else [])],
                   check=True, capture_output=True, timeout=300)


@pytest.fixture
def pg_outage() -> Iterator[object]:
    """`stop()` and `start()` the PostgreSQL cluster; it is always running again afterwards."""
    class Outage:
        stopped_at: float | None = None

        def stop(self) -> None:
            _pg("stop")
            self.stopped_at = time.monotonic()

        def start(self) -> None:
            _pg("start")
            self.stopped_at = None

    outage = Outage()
    try:
        yield outage
    finally:
        subprocess.run(["pg_ctlcluster", *_cluster(), "start"], capture_output=True, timeout=300)


@pytest.fixture
def pg_db() -> Iterator[str]:
    with postgres_database() as url:
        yield url


def _config(data: Path):
    # Long enough (6 epochs over two stages, 1 thread) that a 10 s outage lands mid-run.
    cfg = tiny_config(data)
    return replace(cfg, stages=tuple(replace(s, epochs=3) for s in cfg.stages))


def _start_worker(store: RunStore, run_id: str, retry_s: float) -> subprocess.Popen:
    """A real worker process, as the local executor starts one."""
    assert store.claim_run_now(run_id, os.getpid())
    env = {**os.environ, **store.environment(), STORE_RETRY_ENV: str(retry_s),
           "PYTHONUNBUFFERED": "1"}
    log = open(store.files(run_id).log, "ab")  # noqa: SIM115  (closed by the test)
    return subprocess.Popen(worker_command(run_id, store), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _rows(store: RunStore, run_id: str) -> list[tuple[int, int, str]]:
    return sorted((r.stage, r.step, r.key) for r in store.metrics(run_id))


def _reference_rows(tmp_path: Path, cfg) -> list[tuple[int, int, str]]:
    """The rows the same run writes with the store up (SQLite, in this process)."""
    store = RunStore(tmp_path / "reference")
    run = store.create_run(cfg)
    assert store.claim_run_now(run.id, os.getpid())
    assert execute_run(store, run.id) == "finished"
    return _rows(store, run.id)


def _log(store: RunStore, run_id: str) -> str:
    return store.files(run_id).log.read_text(errors="replace")


def _supervisor_left(store: RunStore) -> None:
    """The queue supervisor a worker started (it keeps one alive) exits once nothing is
    active: wait for that before the test's database is dropped."""
    wait_for(lambda: not supervisor.is_running(store), DEADLINE_S, "the supervisor to exit")


def _stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def test_a_10_s_postgresql_restart_mid_training_loses_and_duplicates_no_row(
        pg_db, pg_outage, tmp_path, tiny_folder):
    cfg = _config(tiny_folder)
    expected = _reference_rows(tmp_path, cfg)
    store = RunStore(tmp_path / "runs", url=pg_db)
    run = store.create_run(cfg, name="through an outage")
    worker = _start_worker(store, run.id, retry_s=300)
    try:
        # Training has written rows and is far from done: stop the server.
        wait_for(lambda: len(store.metrics(run.id)) >= 4, DEADLINE_S, "the first metric rows")
        rows_before = len(store.metrics(run.id))
        pg_outage.stop()
        wait_for(lambda: "unavailable" in _log(store, run.id), DEADLINE_S,
                 "the worker to meet the outage")
        # The outage lasts 10 s: a restart, not a wait for a condition.
        time.sleep(max(0.0, 10.0 - (time.monotonic() - pg_outage.stopped_at)))
        pg_outage.start()
        assert worker.wait(timeout=DEADLINE_S) == 0, _log(store, run.id)[-3000:]
        _supervisor_left(store)
    finally:
        _stop_group(worker)
    done = store.get_run(run.id)
    assert done.status == "finished", done.error
    stored = store.metrics(run.id)
    got = _rows(store, run.id)
    print(f"rows written {len(expected)}, stored {len(got)} (before the stop {rows_before}); "
          f"duplicates {sum(n - 1 for n in Counter(got).values())}")
    assert got == expected  # none lost, none twice
    assert [r.id for r in stored] == list(range(1, len(stored) + 1))  # seq with no gap
    log = _log(store, run.id)
    assert "unavailable" in log and "is back after" in log


def test_an_outage_longer_than_the_window_fails_the_run_in_one_line_and_it_resumes(
        pg_db, pg_outage, tmp_path, tiny_folder):
    cfg = _config(tiny_folder)
    expected = _reference_rows(tmp_path, cfg)
    store = RunStore(tmp_path / "runs", url=pg_db)
    run = store.create_run(cfg, name="past the window")
    window_s = 15
    worker = _start_worker(store, run.id, retry_s=window_s)
    try:
        wait_for(lambda: len(store.metrics(run.id)) >= 4, DEADLINE_S, "the first metric rows")
        pg_outage.stop()
        wait_for(lambda: "the run stopped" in _log(store, run.id), DEADLINE_S,
                 "the worker to give up on the store")
        pg_outage.start()  # the outcome is recorded once the store is back
        worker.wait(timeout=DEADLINE_S)
        _supervisor_left(store)
    finally:
        _stop_group(worker)
    failed = store.get_run(run.id)
    assert failed.status == "failed"
    location = store.location
    assert "finetune_test" in location and ":finetune_test@" not in failed.error  # no password
    assert failed.error.startswith(f"the run store at {location} could not be written for "
                                   f"{window_s} s (")
    assert "\n" not in failed.error and failed.error.endswith(
        "the run stopped; resume it once the store is back")
    # Resumable: it continues from its last saved epoch and ends with every row once.
    assert store.requeue(run.id)
    assert store.claim_run_now(run.id, os.getpid())
    assert execute_run(store, run.id) == "finished", store.get_run(run.id).error
    assert _rows(store, run.id) == expected


def test_the_supervisor_survives_an_outage(pg_db, pg_outage, tmp_path):
    store = RunStore(tmp_path / "runs", url=pg_db)
    run = store.create_run(tiny_config(tmp_path), name="watched")
    assert store.claim_run_now(run.id, os.getpid())  # alive (this process): only watched
    env = {**os.environ, **store.environment(), "PYTHONUNBUFFERED": "1"}
    log_path = store.layout.supervisor_log
    with open(log_path, "ab") as log:
        sup = subprocess.Popen([sys.executable, "-m", "core.runs.supervisor", "--data-dir",
                                str(store.root)], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: supervisor.is_running(store), DEADLINE_S, "the supervisor")
        pg_outage.stop()
        wait_for(lambda: "run store unavailable" in log_path.read_text(), DEADLINE_S,
                 "the supervisor to meet the outage")
        pg_outage.start()
        wait_for(lambda: "run store back" in log_path.read_text(), DEADLINE_S,
                 "the supervisor to find the store back")
        assert sup.poll() is None, log_path.read_text()[-3000:]
        # Still working: it exits by itself once nothing is active.
        store.finish_run(run.id, "finished")
        assert sup.wait(timeout=DEADLINE_S) == 0
    finally:
        _stop_group(sup)
    text = log_path.read_text()
    assert "Traceback" not in text and text.count("run store unavailable") == 1


def test_a_write_whose_acknowledgement_was_lost_is_not_stored_twice(pg_store):
    """The case retries must not double: the commit went through, the worker never heard.
    Retrying with the same batch token adds nothing."""
    run = pg_store.create_run(tiny_config(Path("/nonexistent")))
    rows = [(1, 0.5, 1, "train/step_loss", 1.0), (1, 0.5, 1, "lr", 0.01)]
    pg_store.log_metrics(run.id, rows, batch="b1")
    pg_store.log_metrics(run.id, rows, batch="b1")  # the retry
    pg_store.log_metrics(run.id, rows, batch="b2")  # a new write of equal rows
    assert [m.id for m in pg_store.metrics(run.id)] == [1, 2, 3, 4]


def test_a_store_that_cannot_be_reached_is_named_without_its_password(tmp_path):
    """What a worker says when it gives up: the store without password, and the cause."""
    from core.runs.recorder import StoreUnavailable, StoreWriter

    store = RunStore(tmp_path / "runs")
    run = store.create_run(tiny_config(tmp_path))
    writer = StoreWriter(store, run.id, retry_s=0.5)
    calls = []

    def down(*_args: object) -> None:
        calls.append(1)
        raise StoreError("Could not write to the run store (server closed the connection)")
    try:
        with pytest.raises(StoreUnavailable) as info:
            writer.write(down)
    finally:
        writer.close()
    assert len(calls) > 1  # retried with backoff before giving up
    assert str(info.value) == (f"the run store at {store.location} could not be written for "
                               f"0.5 s (Could not write to the run store (server closed the "
                               f"connection)): the run stopped; resume it once the store is back")

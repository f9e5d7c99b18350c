"""Issue 22.2: the queue stalled when its supervisor died before the worker. A worker of
the local queue keeps the supervisor alive, and `core runs`, which settles dead runs, also
starts the next one. Real worker and supervisor processes, killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from core import config as cfgmod
from core.runs import jobs, supervisor
from core.runs.store import RunStore
from tests.conftest import tiny_config, wait_for

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 240  # generous for a loaded 2-core machine; polled


def _long_config(tiny_folder):
    """Still training when the test kills it."""
    return cfgmod.with_stage(tiny_config(tiny_folder, batch_size=4), 0, epochs=200)


def _supervisor_pids(store: RunStore) -> list[int]:
    """The supervisor processes of this store (its command line names the store)."""
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "core.runs.supervisor" in cmd and str(store.root) in cmd:
            pids.append(proc.info["pid"])
    return pids


def _kill_supervisors(store: RunStore) -> None:
    for pid in _supervisor_pids(store):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not supervisor.is_running(store), 30, "the supervisor's lock to go")


def _two_runs(store: RunStore, tiny_folder, monkeypatch):
    monkeypatch.setenv(jobs.MAX_JOBS_ENV, "1")
    first = jobs.submit(store, _long_config(tiny_folder), name="first")
    second = jobs.submit(store, _long_config(tiny_folder), name="second")
    wait_for(lambda: store.get_run(first.id).pid, DEADLINE_S, "the first worker")
    wait_for(lambda: supervisor.is_running(store), DEADLINE_S, "the supervisor")
    assert store.get_run(second.id).status == "queued"
    return first, second


def _clean_up(store: RunStore, *runs) -> None:
    for run in runs:
        jobs.cancel(store, run.id)  # a queued one at once
        jobs.kill(store, run.id)  # a running one: its worker too
    wait_for(lambda: not supervisor.is_running(store), DEADLINE_S, "the supervisor to exit")


def test_a_worker_revives_a_killed_supervisor_and_the_queue_moves_on(store, tiny_folder,
                                                                     monkeypatch):
    first, second = _two_runs(store, tiny_folder, monkeypatch)
    try:
        # A second submit may have started a second supervisor, which leaves at once.
        old = wait_for(lambda: _supervisor_pids(store) if len(_supervisor_pids(store)) == 1
                       else None, DEADLINE_S, "one supervisor")
        _kill_supervisors(store)
        # The first run's worker notices within SUPERVISOR_CHECK_S and starts another.
        wait_for(lambda: supervisor.is_running(store), DEADLINE_S, "a revived supervisor")
        assert not set(old) & set(_supervisor_pids(store))
        os.killpg(store.get_run(first.id).pid, signal.SIGKILL)
        # No page, no command: only reads from here on.
        wait_for(lambda: store.get_run(second.id).status != "queued", DEADLINE_S,
                 "the next run to start")
        dead = store.get_run(first.id)
        assert dead.status == "failed" and "exited without reporting" in dead.error
    finally:
        _clean_up(store, first, second)


def test_core_runs_settles_a_dead_run_and_starts_the_next(store, tiny_folder, monkeypatch):
    first, second = _two_runs(store, tiny_folder, monkeypatch)
    try:
        _kill_supervisors(store)
        os.killpg(store.get_run(first.id).pid, signal.SIGKILL)
        _kill_supervisors(store)  # one the worker revived meanwhile, if any
        # Both gone: nothing watches the queue, nothing settled the dead run.
        assert store.get_run(first.id).status == "running"
        assert store.get_run(second.id).status == "queued"
        env = {**os.environ, **store.environment(), jobs.MAX_JOBS_ENV: "1"}
        out = subprocess.run([sys.executable, "-m", "core", "--data-dir", str(store.root),
                              "runs"], capture_output=True, text=True, cwd=ROOT, env=env,
                             timeout=DEADLINE_S)
        assert out.returncode == 0, out.stderr
        assert store.get_run(first.id).status == "failed"
        assert store.get_run(second.id).status == "running"  # started by the command
        wait_for(lambda: supervisor.is_running(store), DEADLINE_S, "a supervisor watching it")
    finally:
        _clean_up(store, first, second)

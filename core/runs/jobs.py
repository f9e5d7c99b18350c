"""Background jobs: one detached process per run, a queue with a concurrency limit,
cancellation, and detection of runs whose worker died.

A job is `python -m core.runs.worker RUN_ID` started in its own session (process group), so a
page rerun, a closed tab or a restarted Streamlit server does not stop it. The queue lives
in the store: `dispatch` atomically claims queued runs up to the limit and starts their
workers; each worker dispatches again when it ends, so the queue drains with no UI open.
No torch import here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from core import config as cfgmod
from core.process import is_alive
from core.runs.files import DATA_DIR_ENV, RunFiles
from core.runs.store import Run, RunStore

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MAX_JOBS_ENV = "FINETUNE_LAB_MAX_JOBS"
HEARTBEAT_S = 2.0  # how often a worker reports it is alive, seconds
# A running run with no heartbeat for this long is declared failed even when its process
# cannot be checked (another host). Same-host deaths are found at once via the pid.
STALE_AFTER_S = 30.0
# A claimed run whose worker never wrote its pid within this long failed to start.
START_GRACE_S = 60.0

# Popen handles of workers this process started: polled so they are reaped, not zombies.
_children: list[subprocess.Popen[bytes]] = []


def max_jobs() -> int:
    """Concurrent training runs. One by default: two runs on a 2-core CPU each go at
    half speed and use twice the memory, with nothing gained."""
    try:
        return max(1, int(os.environ.get(MAX_JOBS_ENV, "1")))
    except ValueError:
        return 1


def submit(store: RunStore, cfg: cfgmod.RunConfig, name: str = "", group: str = "",
           start: bool = True, check_data: bool = True) -> Run:
    """Validate `cfg` (values, then data and weights: core.runs.preflight), queue it as a new
    run, and start workers if there is room. Raises ConfigError / PreflightError."""
    cfgmod.check(cfg)
    if check_data:
        from core.runs.preflight import preflight

        preflight(cfg, store)
    run = store.create_run(cfg, name=name, group=group)
    if start:
        dispatch(store)
    return store.get_run(run.id) or run


def submit_seeds(store: RunStore, cfg: cfgmod.RunConfig, seeds: list[int], name: str,
                 group: str) -> list[Run]:
    """Queue one run per seed as a group (for mean ± std across seeds)."""
    from core.runs.preflight import preflight

    cfgmod.check(cfg)
    preflight(cfg, store)  # once: the seeds share data and weights
    runs = [submit(store, replace(cfg, seed=s), name=f"{name} seed {s}", group=group, start=False,
                   check_data=False) for s in seeds]
    dispatch(store)
    return runs


def worker_command(run_id: str, store: RunStore) -> list[str]:
    return [sys.executable, "-m", "core.runs.worker", run_id, "--data-dir", str(store.root)]


def _spawn(store: RunStore, run: Run) -> int:
    log_path = store.files(run.id).log
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, DATA_DIR_ENV: str(store.root), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            worker_command(run.id, store), cwd=PROJECT_ROOT, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,  # own process group: survives the server
        )
    _children.append(proc)
    return proc.pid


def dispatch(store: RunStore) -> list[str]:
    """Start workers for queued runs while fewer than max_jobs() run. Returns started ids."""
    reconcile(store)
    started = []
    while (run := store.claim_next_queued(max_jobs())) is not None:
        try:
            store.set_pid(run.id, _spawn(store, run))
            started.append(run.id)
        except OSError as exc:
            store.finish_run(run.id, "failed", f"could not start the worker process: {exc}")
    return started


def _reap() -> None:
    for proc in list(_children):
        if proc.poll() is not None:
            _children.remove(proc)


def pid_is_worker(pid: int, pid_start: str | None) -> bool:
    """Whether the process `pid` that was recorded for a run is still that process and
    alive: not a zombie, and started at the recorded time (so a reused pid does not count).
    Works for detached workers and for foreground CLI runs alike."""
    return is_alive(pid, pid_start)


def liveness_problem(run: Run, now: float | None = None) -> str | None:
    """Why a 'running' run is actually dead, or None if it looks alive."""
    import socket

    now = now or time.time()
    same_host = run.host in (None, socket.gethostname())
    if run.pid is None:
        if now - (run.started_at or now) > START_GRACE_S:
            return f"the worker never started (no process after {START_GRACE_S:.0f} s)"
        return None
    if same_host:
        # The process itself is the truth here; a late heartbeat only means a busy machine.
        if pid_is_worker(run.pid, run.pid_start):
            return None
        return (f"the worker process (pid {run.pid}) exited without reporting a result: "
                f"killed, out of memory, or the machine restarted. See the run log; the run "
                f"can be resumed from its last completed epoch")
    if run.heartbeat_at is not None and now - run.heartbeat_at > STALE_AFTER_S:
        return f"no heartbeat from the worker for {now - run.heartbeat_at:.0f} s"
    return None


def reconcile(store: RunStore) -> list[str]:
    """Mark running runs whose worker is gone as failed, with the reason. Returns their ids."""
    _reap()
    failed = []
    for run in store.list_runs(statuses=("running",)):
        problem = liveness_problem(run)
        if problem and store.finish_run(run.id, "failed", problem, only_if_running=True):
            failed.append(run.id)
            remove_partial_files(store.files(run.id))
    return failed


def remove_partial_files(files: RunFiles) -> list[Path]:
    """Delete temp files a killed worker left mid-write (atomic writes go through temp
    files first, so the real files are always whole)."""
    removed = []
    for tmp in files.temp_files():
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def cancel(store: RunStore, run_id: str) -> Run | None:
    """Ask a run to stop (honoured between batches); queued runs are cancelled at once."""
    return store.request_cancel(run_id)


def kill(store: RunStore, run_id: str) -> Run | None:
    """Force stop, for a run that did not honour a cancel (stuck loading data, say):
    SIGKILL the worker's process group and record the run as cancelled. Its last completed
    epoch stays resumable."""
    run = store.get_run(run_id)
    if run and run.pid and run.status == "running" and pid_is_worker(run.pid, run.pid_start):
        try:
            if os.getpgid(run.pid) == run.pid:  # a detached worker leads its own group
                os.killpg(run.pid, signal.SIGKILL)
            else:  # a foreground CLI run: only that process
                os.kill(run.pid, signal.SIGKILL)
        except OSError:
            pass
        _reap()
    if run and run.status == "running":
        store.finish_run(run_id, "cancelled", "force-stopped (the run did not stop on request)",
                         only_if_running=True)
        remove_partial_files(store.files(run_id))
    return store.get_run(run_id)


def resume(store: RunStore, run_id: str) -> Run | None:
    """Re-queue a failed or cancelled run; its worker continues from the last checkpoint."""
    store.requeue(run_id)
    dispatch(store)
    return store.get_run(run_id)


def log_tail(store: RunStore, run_id: str, max_bytes: int = 8000) -> str:
    path = store.files(run_id).log
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class ActiveRuns:
    """What the sidebar shows: runs training now and runs waiting, newest first."""

    running: list[Run]
    queued: list[Run]


def summary(store: RunStore) -> ActiveRuns:
    """Running and queued runs, as the store has them. A read: starts and settles nothing."""
    runs = store.list_runs(statuses=("queued", "running"))
    return ActiveRuns(running=[r for r in runs if r.status == "running"],
                      queued=[r for r in runs if r.status == "queued"])


def advance_queue(store: RunStore) -> list[str]:
    """Settle runs whose worker died and start queued runs in their place (a killed worker
    cannot start the next one itself). An action: the sidebar calls it by this name until a
    supervisor advances the queue (a later issue). Returns the ids started."""
    return dispatch(store)

"""What every executor shares: the interface, the worker command, and the timing bounds.

An executor runs a queued run's worker somewhere (a local process, a Ray job), stops it, and
tells whether a run it holds is still alive and, when not, why. The queue, cancel requests
and outcomes live in the store; an executor only moves processes. No torch import here.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from core.process import is_alive
from core.settings import RunFiles
from core.runs.store import Run, RunStore

PROJECT_ROOT = Path(__file__).resolve().parents[3]
EXECUTOR_ENV = "FINETUNE_LAB_EXECUTOR"
HEARTBEAT_S = 2.0  # how often a worker reports it is alive, seconds
# A running run with no heartbeat for this long is declared failed even when its process
# cannot be checked (another host). Same-host deaths are found at once via the pid.
STALE_AFTER_S = 30.0
# A claimed run whose worker never wrote its pid within this long failed to start.
START_GRACE_S = 60.0


@dataclass(frozen=True)
class Verdict:
    """How a run that its store calls active really ended, and why."""

    status: str  # "failed" or "cancelled"
    reason: str


class Executor(Protocol):
    name: str
    poll_s: float  # how often the supervisor looks at the runs it holds, seconds

    def dispatch(self, store: RunStore) -> list[str]:
        """Hand queued runs to execution. Returns the ids handed over."""

    def verdict(self, run: Run, now: float) -> Verdict | None:
        """Why an active run (queued with a job, or running) is actually over, or None."""

    def stop(self, store: RunStore, run: Run) -> None:
        """Force-stop the run's worker now (the store is settled by the caller)."""

    def log_fallback(self, run: Run, max_bytes: int) -> str:
        """The run's log from the executor, for when the worker's own log file is not
        readable here (another node without the shared path). "" when there is none."""


def worker_command(run_id: str, store: RunStore, *, claim: bool = False) -> list[str]:
    """The worker's command line, the same for every executor. `claim`: the worker moves
    its queued run to running itself (the cluster queued it, not us)."""
    cmd = [sys.executable, "-m", "core.runs.worker", run_id, "--data-dir", str(store.root)]
    return cmd + ["--claim", "--log-to-run-folder"] if claim else cmd


def pid_is_worker(pid: int, pid_start: str | None) -> bool:
    """Whether the process `pid` that was recorded for a run is still that process and
    alive: not a zombie, and started at the recorded time (so a reused pid does not count).
    Works for detached workers and for foreground CLI runs alike."""
    return is_alive(pid, pid_start)


def liveness_problem(run: Run, now: float | None = None) -> str | None:
    """Why a 'running' run is actually dead, or None if it looks alive: its process, when
    it runs on this host; its heartbeat, when it runs elsewhere."""
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


def writer_is_gone(run: Run) -> bool:
    """Whether no worker process of `run` can still be writing its files: its process, on
    this host, is verifiably gone. A worker on another host, or one whose pid is unknown,
    may still be writing (a cluster that lost its head, a job Ray no longer knows), so it
    does not count as gone: its own resume cleans what it left."""
    import socket

    if run.pid is None or run.host not in (None, socket.gethostname()):
        return run.pid is None and run.started_at is None  # never started: nothing written
    return not pid_is_worker(run.pid, run.pid_start)


def remove_partial_files(files: RunFiles, run: Run | None = None) -> list[Path]:
    """Delete temp files a killed worker left mid-write (atomic writes go through temp
    files first, so the real files are always whole). With `run`, only when its worker is
    gone (writer_is_gone): a live worker's temp file is its checkpoint being written.
    Without, the caller is the writer itself or knows it is dead."""
    if run is not None and not writer_is_gone(run):
        return []
    removed = []
    for tmp in files.temp_files():
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed

"""The local executor (the default): one detached `python -m core.runs.worker RUN_ID`
process per run, in its own session, so a page rerun, a closed tab or a restarted server
does not stop it. The queue is in the store; `dispatch` atomically claims queued runs up to
FINETUNE_LAB_MAX_JOBS and starts their workers. No torch import here."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

from core.runs.executors.base import (
    PROJECT_ROOT,
    Verdict,
    liveness_problem,
    pid_is_worker,
    worker_command,
)
from core.runs.store import Run, RunStore

MAX_JOBS_ENV = "FINETUNE_LAB_MAX_JOBS"

# Popen handles of processes this process started: polled so they are reaped, not zombies.
_children: list[subprocess.Popen[bytes]] = []


def max_jobs() -> int:
    """Concurrent training runs. One by default: two runs on a 2-core CPU each go at
    half speed and use twice the memory, with nothing gained."""
    try:
        return max(1, int(os.environ.get(MAX_JOBS_ENV, "1")))
    except ValueError:
        return 1


def reap() -> None:
    for proc in list(_children):
        if proc.poll() is not None:
            _children.remove(proc)


def spawn_detached(cmd: list[str], log_path: os.PathLike[str], env: dict[str, str]) -> int:
    """Start `cmd` in its own session (it outlives this process), output appended to
    `log_path`. Returns its pid."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    _children.append(proc)
    return proc.pid


class LocalExecutor:
    name = "local"
    poll_s = 0.5  # a process check is cheap: a dead worker's slot refills within this

    def dispatch(self, store: RunStore) -> list[str]:
        """Start workers for queued runs while fewer than max_jobs() run."""
        reap()
        started = []
        while (run := store.claim_next_queued(max_jobs())) is not None:
            try:
                pid = self._spawn(store, run)
            except OSError as exc:
                store.finish_run(run.id, "failed", f"could not start the worker process: {exc}")
                continue
            store.set_pid(run.id, pid)
            store.set_job(run.id, self.name, str(pid), socket.gethostname())
            started.append(run.id)
        return started

    def _spawn(self, store: RunStore, run: Run) -> int:
        log_path = store.files(run.id).log
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **store.environment(), "PYTHONUNBUFFERED": "1"}
        return spawn_detached(worker_command(run.id, store), log_path, env)

    def verdict(self, run: Run, now: float) -> Verdict | None:
        if run.status != "running":
            return None  # a queued run here has no process yet
        problem = liveness_problem(run, now)
        return Verdict("failed", problem) if problem else None

    def stop(self, store: RunStore, run: Run) -> None:
        """SIGKILL the worker's process group (a foreground CLI run: only its process)."""
        if run.pid and pid_is_worker(run.pid, run.pid_start):
            try:
                if os.getpgid(run.pid) == run.pid:  # a detached worker leads its own group
                    os.killpg(run.pid, signal.SIGKILL)
                else:
                    os.kill(run.pid, signal.SIGKILL)
            except OSError:
                pass
        reap()

    def log_fallback(self, run: Run, max_bytes: int) -> str:
        return ""

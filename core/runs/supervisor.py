"""The queue supervisor: what advances the queue when no browser is open.

    python -m core.runs.supervisor [--data-dir DIR]

One detached process per store (it holds an exclusive lock on the store's supervisor.lock),
started by the first submit (core.runs.jobs.dispatch). Every few moments (the executor's
poll_s) it settles runs whose worker died (with the reason), hands queued runs to the
executor as slots free up, and stops cluster jobs that have not honoured a cancel request within CANCEL_GRACE_S. It exits
when nothing is queued or running. No torch import here.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import tenacity

from core.runs import executors
from core.runs.executors.local import spawn_detached
from core.runs.queue_steps import advance
from core.runs.store import (
    ACTIVE,
    NewerSchemaError,
    RunStore,
    StoreError,
    store_failure_reason,
)
from core.settings import store_retry_s

log = logging.getLogger("finetune_lab.supervisor")
# Seconds a cluster job gets to honour a cancel request (between batches) before Ray is
# asked to stop it; a local run that ignores one is force-stopped from the Runs page.
CANCEL_GRACE_S = 20.0
PROBE_WAIT_S = 2.0  # how long a starting supervisor waits for the lock, seconds


@contextlib.contextmanager
def _lock(path: Path, wait_s: float = 0.0) -> Iterator[bool]:
    """Try to hold `path`'s exclusive lock for up to `wait_s` seconds; yields whether it is
    held. The kernel drops it when the holder dies, so a killed supervisor never blocks the
    next one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(0.02)  # a probe holds it for microseconds; a supervisor for good
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def is_running(store: RunStore) -> bool:
    """Whether a supervisor holds this store's lock."""
    with _lock(store.layout.supervisor_lock) as free:
        return not free


def ensure_running(store: RunStore) -> None:
    """Start the store's supervisor unless one runs. Two callers racing may both start
    one; the second finds the lock taken and exits at once."""
    if is_running(store):
        return
    cmd = [sys.executable, "-m", "core.runs.supervisor", "--data-dir", str(store.root)]
    env = {**os.environ, **store.environment(), "PYTHONUNBUFFERED": "1"}
    try:
        spawn_detached(cmd, store.layout.supervisor_log, env)
    except OSError as exc:
        log.warning("could not start the queue supervisor: %s", exc)


class StoreWatch:
    """Whether anything is active, asked in a way a store outage cannot end: while the
    store cannot be read the answer is "yes, keep watching", and the outage is logged once
    when it starts and once when it ends (not at every poll)."""

    def __init__(self) -> None:
        self.down_since: float | None = None

    def active(self, store: RunStore) -> bool:
        try:
            active = bool(store.list_runs(statuses=ACTIVE))
        except StoreError as exc:
            self.failed(exc)
            return True
        self.ok()
        return active

    def failed(self, exc: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("run store unavailable, retrying: %s", store_failure_reason(exc))

    def ok(self) -> None:
        if self.down_since is not None:
            log.info("run store back after %.1f s", time.monotonic() - self.down_since)
            self.down_since = None


class CancelEscalation:
    """Remembers when each cancel request was first seen, and stops the cluster job of a
    run that is still running CANCEL_GRACE_S later."""

    def __init__(self) -> None:
        self.first_seen: dict[str, float] = {}

    def check(self, store: RunStore, now: float) -> None:
        pending = {r.id: r for r in store.list_runs(statuses=("running",)) if r.cancel_requested}
        self.first_seen = {i: self.first_seen.get(i, now) for i in pending}
        for run_id, seen in self.first_seen.items():
            run = pending[run_id]
            if run.executor == "ray" and now - seen > CANCEL_GRACE_S:
                log.info("run %s ignored its cancel request for %.0f s: stopping job %s",
                         run_id, now - seen, run.job_id)
                executors.executor_named(run.executor).stop(store, run)


def supervise(store: RunStore) -> None:
    """Advance the queue until nothing is active. Holds the lock while it runs."""
    escalation = CancelEscalation()
    watch = StoreWatch()
    poll_s = executors.current().poll_s  # seconds between looks at the store and executor
    while True:
        # Wait out probes (is_running holds the lock for an instant); a supervisor that
        # really runs holds it for longer than this.
        with _lock(store.layout.supervisor_lock, wait_s=PROBE_WAIT_S) as held:
            if not held:
                log.info("another supervisor watches %s", store.root)
                return
            while watch.active(store):
                try:
                    advance(store)
                    escalation.check(store, time.time())
                except StoreError as exc:  # logged once per outage by the watch
                    watch.failed(exc)
                except Exception as exc:  # an unreachable cluster, a bug: retry
                    log.warning("queue step failed, retrying: %s", exc)
                time.sleep(poll_s)  # a polling interval, not a wait for something
        # Released. A submit that came in meanwhile saw the lock held and started nothing,
        # so look once more before leaving: its run is in the store by now.
        if not watch.active(store):
            log.info("queue empty and nothing running: exiting")
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.runs.supervisor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="run store folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s supervisor %(process)d %(levelname)s %(message)s")
    try:
        store = open_store(args.data_dir)
    except StoreError as exc:
        log.error("%s", exc)
        return 1
    supervise(store)
    return 0


def open_store(data_dir: str | None) -> RunStore:
    """The store, opened through an outage (a worker may start a supervisor while the
    database restarts): retried with backoff for the store retry window."""
    def transient(exc: BaseException) -> bool:  # a newer schema will not go away
        return isinstance(exc, StoreError) and not isinstance(exc, NewerSchemaError)

    for attempt in tenacity.Retrying(retry=tenacity.retry_if_exception(transient),
                                     stop=tenacity.stop_after_delay(store_retry_s()),
                                     wait=tenacity.wait_exponential(multiplier=0.1, max=5.0),
                                     reraise=True):
        with attempt:
            return RunStore(data_dir)
    raise AssertionError("unreachable: tenacity returns or raises")


if __name__ == "__main__":
    sys.exit(main())

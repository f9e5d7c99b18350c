"""One step of the queue: settle runs whose worker is gone, then hand queued runs to the
executor. What both the jobs facade (core.runs.jobs, on a submit) and the supervisor
(core.runs.supervisor, in its loop) do, in a module below both so imports run one way:
queue_steps <- supervisor <- jobs. No torch import here.
"""

from __future__ import annotations

import os
import time

from core.runs import executors
from core.runs.executors.base import remove_partial_files
from core.runs.executors.local import reap
from core.runs.store import ACTIVE, RunStore


def advance(store: RunStore) -> list[str]:
    """One scheduling step: settle runs whose worker is gone, then hand queued runs to the
    executor. Returns the ids handed over. What the supervisor does in its loop."""
    reconcile(store)
    return executors.current().dispatch(store)


def reconcile(store: RunStore) -> list[str]:
    """Settle active runs that are actually over (worker died, job failed or was stopped),
    with the reason. Returns their ids."""
    reap()
    settled = []
    now = time.time()
    active = store.list_runs(statuses=ACTIVE)
    if any(r.executor == "ray" for r in active) and os.environ.get("RAY_ADDRESS"):
        from core.runs.executors.ray import check_health

        check_health(store)  # "unreachable since ..." for the sidebar and `core runs`
    for run in active:
        if run.status == "queued" and not run.job_id:
            continue  # not handed to anyone yet
        verdict = executors.executor_named(run.executor).verdict(run, now)
        if verdict is None:
            continue
        if run.status == "running":
            done = store.finish_run(run.id, verdict.status, verdict.reason, only_if_running=True)
        else:  # a job that died before its worker claimed the run
            done = store.finish_run(run.id, verdict.status, verdict.reason)
        if done:
            settled.append(run.id)
            remove_partial_files(store.files(run.id), run)  # only a dead writer's
    return settled

"""Background jobs, the one facade the pages and the command line call: submit, cancel,
force-stop, resume, and what is active. Where a run executes is the executor's business
(core.runs.executors: a local process by default, a Ray job with FINETUNE_LAB_EXECUTOR=ray);
the queue, cancel requests and outcomes live in the store.

The queue does not depend on a browser: `dispatch` hands queued runs to the executor and
makes sure a supervisor (core.runs.supervisor, one detached process per store) is watching,
which settles runs whose worker died and starts queued runs as slots free up, then exits
when nothing is left. No torch import here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

from core import config as cfgmod
from core.runs import executors, supervisor
from core.runs.executors.base import (  # noqa: F401  (re-exported: the facade's vocabulary)
    EXECUTOR_ENV,
    HEARTBEAT_S,
    PROJECT_ROOT,
    STALE_AFTER_S,
    START_GRACE_S,
    liveness_problem,
    pid_is_worker,
    remove_partial_files,
    worker_command,
)
from core.runs.executors.local import MAX_JOBS_ENV, max_jobs, reap  # noqa: F401
from core.runs.queue_steps import advance, reconcile  # noqa: F401  (re-exported: the facade's steps)
from core.runs.store import ACTIVE, Run, RunStore

log = logging.getLogger("finetune_lab.jobs")


@dataclass(frozen=True)
class RunResources:
    """What each run of a batch (an experiment's, a search's trials) may use: CPU threads
    (0: auto; on Ray that reserves one CPU and trains with one thread) and the device
    ("auto", "cpu", "cuda", "mps"). Kept in the run's config, so a Ray job reserves exactly
    this (CPUs = threads; a GPU share by resolution for cuda: executors.ray.job_request) and
    a resumed run asks for the same."""

    threads: int = 0
    device: str = "auto"

    def apply(self, cfg: cfgmod.RunConfig) -> cfgmod.RunConfig:
        return replace(cfg, threads=self.threads, device=self.device)


def submit(store: RunStore, cfg: cfgmod.RunConfig, name: str = "", group: str = "",
           start: bool = True, check_data: bool = True,
           resources: RunResources | None = None, started_by: str | None = None) -> Run:
    """Validate `cfg` (values, then data and weights: core.runs.preflight), queue it as a new
    run, and hand it to the executor. `resources`, when given, replace the config's threads
    and device. Raises ConfigError / PreflightError."""
    cfg = resources.apply(cfg) if resources is not None else cfg
    cfgmod.check(cfg)
    if check_data:  # (submit_seeds checked the name it was given and the group)
        cfgmod.check_text_limits(name=name, group=group)
        from core.runs.preflight import preflight

        report = preflight(cfg, store)
        check_executor(store, cfg, report.memory_bytes)
    run = store.create_run(cfg, name=name, group=group, started_by=started_by)
    if start:
        dispatch(store)
    return store.get_run(run.id) or run


def submit_seeds(store: RunStore, cfg: cfgmod.RunConfig, seeds: list[int], name: str,
                 group: str, resources: RunResources | None = None,
                 started_by: str | None = None) -> list[Run]:
    """Queue one run per seed as a group (for mean ± std across seeds), each with
    `resources` when given."""
    from core.runs.preflight import preflight

    cfg = resources.apply(cfg) if resources is not None else cfg
    cfgmod.check(cfg)
    cfgmod.check_text_limits(name=name, group=group)
    report = preflight(cfg, store)  # once: the seeds share data and weights
    check_executor(store, cfg, report.memory_bytes)
    runs = [submit(store, replace(cfg, seed=s), name=f"{name} seed {s}", group=group, start=False,
                   check_data=False, started_by=started_by) for s in seeds]
    dispatch(store)
    return runs


def check_executor(store: RunStore, cfg: cfgmod.RunConfig, memory_bytes: int) -> None:
    """Refuse, before a run exists, a submit where it would run cannot take: a Ray cluster
    that does not answer or has no node with the CPUs, GPU and memory (bytes) the run asks
    for; locally, a device this machine does not have. Raises ExecutorUnavailable (a
    PreflightError) naming what there is."""
    from core.runs.preflight import ExecutorUnavailable, device_problem

    try:
        executor = executors.current()
        if executor.name == "ray":
            from core.runs.executors.ray import check_submit

            check_submit(store, cfg, memory_bytes)
        elif problem := device_problem(cfg):
            raise ExecutorUnavailable([problem])
    except (ValueError, RuntimeError) as exc:  # RayUnavailable, an unknown executor name
        raise ExecutorUnavailable([str(exc)]) from None


def cluster_notice(store: RunStore, short: bool = False) -> str | None:
    """A line saying the Ray cluster is unreachable, since when and at which address (with
    what to do, unless `short`), or None (it answers, or no cluster is in use). For
    `core runs` and, short, the sidebar."""
    try:
        current = executors.current().name
    except ValueError:  # a misspelt executor: submit says so
        current = None
    if current != "ray" and not any(
            r.executor == "ray" for r in store.list_runs(statuses=ACTIVE)):
        return None
    from core.runs.executors.ray import cluster_notice as notice

    return notice(store, short)


def dispatch(store: RunStore) -> list[str]:
    """Hand queued runs to the executor now, and make sure the supervisor watches while
    anything is active. Returns the ids handed over."""
    from core.runs.executors.ray import RayUnavailable  # imports no ray

    try:
        started = advance(store)
    except RayUnavailable as exc:  # the cluster is unreachable: the supervisor retries
        log.warning("could not hand queued runs to the executor: %s", exc)
        started = []
    if store.list_runs(statuses=ACTIVE):
        supervisor.ensure_running(store)
    return started


def ensure_watched(store: RunStore) -> bool:
    """If runs are active and no supervisor watches them (after a machine restart no submit
    comes to start one), dispatch: settle, hand over, start a supervisor. Returns whether
    it had to."""
    if store.list_runs(statuses=ACTIVE) and not supervisor.is_running(store):
        dispatch(store)
        return True
    return False


def cancel(store: RunStore, run_id: str) -> Run | None:
    """Ask a run to stop (honoured between batches); queued runs are cancelled at once (a
    queued cluster job is stopped with them). A supervisor stops a cluster job that has not
    honoured the request after a grace period."""
    before = store.get_run(run_id)
    run = store.request_cancel(run_id)
    if before is not None and before.status == "queued" and before.job_id:
        executors.executor_named(before.executor).stop(store, before)
    if run is not None and run.status == "running":
        supervisor.ensure_running(store)
    return run


def kill(store: RunStore, run_id: str) -> Run | None:
    """Force stop, for a run that did not honour a cancel (stuck loading data, say): stop
    its worker at once and record the run as cancelled. Its last completed epoch stays
    resumable."""
    run = store.get_run(run_id)
    if run and run.status == "running":
        # Settled first: a worker that sees its stop signal then finds the run cancelled and
        # does not record the signal as a fault.
        store.finish_run(run_id, "cancelled", "force-stopped (the run did not stop on request)",
                         only_if_running=True)
        executors.executor_named(run.executor).stop(store, run)
        if run.pid and run.executor in (None, "local"):
            from core.process import wait_gone

            wait_gone(run.pid, run.pid_start, timeout_s=5.0)  # SIGKILL lands in moments
        remove_partial_files(store.files(run_id), run)  # only once its writer is gone
    return store.get_run(run_id)


def resume(store: RunStore, run_id: str) -> Run | None:
    """Re-queue a failed or cancelled run; its worker continues from the last checkpoint,
    on whatever executor is current (another node, with Ray)."""
    run = store.get_run(run_id)
    if run is not None and run.status in ("failed", "cancelled"):
        if run.executor == "ray" and run.job_id:
            executors.executor_named("ray").stop(store, run)  # an attempt still alive, if any
        executor = executors.current()
        if executor.name == "ray":
            from core.runs.executors.ray import next_job_id

            # The new attempt's id, recorded before the run is queued again: no one ever
            # sees the queued run with its old, dead job.
            store.set_job(run_id, executor.name, next_job_id(run), None)
    store.requeue(run_id)
    dispatch(store)
    return store.get_run(run_id)


def log_tail(store: RunStore, run_id: str, max_bytes: int = 8000) -> str:
    """The end of the run's log: the file its worker writes in the run's folder, on every
    executor; from the executor when that file is not readable here."""
    path = store.files(run_id).log
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        text = ""
    if not text:
        run = store.get_run(run_id)
        if run is not None and run.executor and run.executor != "local":
            text = executors.executor_named(run.executor).log_fallback(run, max_bytes)
    return text


@dataclass(frozen=True)
class ActiveRuns:
    """What the sidebar shows: runs training now and runs waiting, newest first."""

    running: list[Run]
    queued: list[Run]


def summary(store: RunStore) -> ActiveRuns:
    """Running and queued runs, as the store has them. A read: starts and settles nothing."""
    runs = store.list_runs(statuses=ACTIVE)
    return ActiveRuns(running=[r for r in runs if r.status == "running"],
                      queued=[r for r in runs if r.status == "queued"])

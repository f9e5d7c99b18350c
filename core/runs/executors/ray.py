"""The Ray executor: each run is a Ray job on the cluster at Ray's own RAY_ADDRESS (the head's
dashboard URL, e.g. http://head:8265), submitted with `ray.job_submission.JobSubmissionClient`.

The entrypoint is the same worker command as locally, plus `--claim`: the cluster's scheduler
queues the job until a node has the CPUs/GPU it asks for, and the worker moves its run from
queued to running when it starts. The job's submission id is the run id (a resumed run gets
the run id plus its attempt number, since Ray never reuses an id). The store URL, the data
directory and the artifact root travel in the job's environment; there is no working_dir:
every node has the project installed at the same path (README "Run on a cluster").

Ray is imported lazily: `ray[default]` is an optional extra (requirements-cluster.txt).
"""

from __future__ import annotations

import logging
import os
import shlex
from functools import cache
from typing import TYPE_CHECKING

from core.engine.paths import DATA_ROOTS_ENV
from core.runs.executors.base import PROJECT_ROOT, Verdict, liveness_problem, worker_command
from core.runs.store import Run, RunStore

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

log = logging.getLogger("finetune_lab.jobs")
RAY_ADDRESS_ENV = "RAY_ADDRESS"  # Ray's own setting, read by every Ray tool
# Settings besides the store's own (RunStore.environment) that a worker on another node
# needs: where it may read data sets and where torchvision keeps ImageNet weights.
FORWARDED_ENV = (DATA_ROOTS_ENV, "TORCH_HOME")
# Ray's terminal job states; PENDING and RUNNING are the others.
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class RayUnavailable(RuntimeError):
    """The cluster cannot be reached, or Ray is not installed."""


@cache
def _client(address: str) -> JobSubmissionClient:
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:
        raise RayUnavailable("the Ray executor needs ray[default]: pip install -r "
                             "requirements-cluster.txt") from exc
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # Ray raises ConnectionError/RuntimeError/ValueError here
        raise RayUnavailable(f"cannot reach the Ray cluster at {address}: {exc}") from exc


def client() -> JobSubmissionClient:
    address = os.environ.get(RAY_ADDRESS_ENV)
    if not address:
        raise RayUnavailable(f"set {RAY_ADDRESS_ENV} to the Ray head's dashboard URL "
                             f"(e.g. http://head:8265) to run on a cluster")
    return _client(address)


def _job_info(job_id: str):
    """Ray's JobDetails for `job_id`, or None when Ray does not know the id."""
    try:
        return client().get_job_info(job_id)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            return None
        raise RayUnavailable(str(exc)) from exc
    except OSError as exc:  # requests' ConnectionError is an OSError
        raise RayUnavailable(str(exc)) from exc


def job_resources(run: Run) -> tuple[float, float]:
    """(CPUs, GPUs) the job asks the scheduler for: its torch threads (one when 'auto',
    which then uses the node's cores), and one GPU when the run asks for cuda."""
    cpus = float(run.config.threads or 1)
    gpus = 1.0 if run.config.device == "cuda" else 0.0
    return cpus, gpus


def attempt_id(run_id: str, attempt: int) -> str:
    """The submission id of a run's `attempt`-th job (1-based): the run id, then
    run id + "-2", "-3"... for resumes."""
    return run_id if attempt == 1 else f"{run_id}-{attempt}"


def next_job_id(run: Run) -> str:
    """The first attempt id Ray does not know yet."""
    attempt = 1
    while _job_info(attempt_id(run.id, attempt)) is not None:
        attempt += 1
    return attempt_id(run.id, attempt)


class RayExecutor:
    name = "ray"
    poll_s = 2.0  # one request to the Ray dashboard per active run per look

    def dispatch(self, store: RunStore) -> list[str]:
        """Submit every queued run that has no live job yet; the cluster queues them."""
        submitted = []
        for run in reversed(store.list_runs(statuses=("queued",))):  # oldest first
            if run.executor == self.name and run.job_id:
                info = _job_info(run.job_id)
                if info is not None:
                    continue  # submitted: pending or starting (a dead one is settled in verdict)
                job_id = run.job_id  # chosen (by resume) but not submitted yet
            else:
                job_id = next_job_id(run)
            # Recorded before the job exists, so the worker's claim (which records its host)
            # never races this write.
            store.set_job(run.id, self.name, job_id, None)
            try:
                self._submit(store, run, job_id)
            except RayUnavailable:
                raise
            except Exception as exc:
                if "already exists" in str(exc):
                    continue  # another dispatcher submitted this attempt
                store.finish_run(run.id, "failed", f"Ray refused the job: {exc}")
                continue
            submitted.append(run.id)
        return submitted

    def _submit(self, store: RunStore, run: Run, job_id: str) -> None:
        env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
        env |= store.environment()  # the store URL, data directory, artifact root
        env |= {"PYTHONUNBUFFERED": "1",
                "PYTHONPATH": str(PROJECT_ROOT)}  # the project, installed at the same path
        cpus, gpus = job_resources(run)
        try:
            client().submit_job(
                entrypoint=shlex.join(worker_command(run.id, store, claim=True)),
                submission_id=job_id, runtime_env={"env_vars": env},
                entrypoint_num_cpus=cpus, entrypoint_num_gpus=gpus,
                metadata={"run_id": run.id, "name": run.name[:200]})
        except OSError as exc:
            raise RayUnavailable(str(exc)) from exc
        log.info("run %s submitted to Ray as job %s (%g CPU, %g GPU)", run.id, job_id, cpus, gpus)

    def verdict(self, run: Run, now: float) -> Verdict | None:
        """Ray's word on the run's job first (it knows why a job ended), then the worker's
        process or heartbeat. A cluster that cannot be reached settles nothing."""
        if not run.job_id:
            return None
        try:
            info = _job_info(run.job_id)
        except RayUnavailable:
            info = "unknown"
        if info is None:
            if run.status == "queued":
                return None  # recorded, about to be submitted (dispatch submits it)
            return Verdict("failed", f"the Ray cluster does not know job {run.job_id} (was "
                                     f"the cluster restarted?); the run can be resumed")
        status = getattr(info, "status", None)
        status = getattr(status, "value", status)
        if status in TERMINAL and (run.status == "running" or status != "SUCCEEDED"):
            message = getattr(info, "message", None) or "no reason given"
            if status == "STOPPED" and run.cancel_requested:
                return Verdict("cancelled", f"cancelled by request; Ray stopped job "
                                            f"{run.job_id}: {message}")
            what = {"STOPPED": "was stopped outside the lab", "FAILED": "failed",
                    "SUCCEEDED": "ended without reporting a result"}[status]
            return Verdict("failed", f"Ray job {run.job_id} {what}: {message}. The run can "
                                     f"be resumed from its last completed epoch")
        if run.status == "running":
            problem = liveness_problem(run, now)
            return Verdict("failed", problem) if problem else None
        return None

    def stop(self, store: RunStore, run: Run) -> None:
        if run.job_id:
            try:
                client().stop_job(run.job_id)
            except Exception as exc:  # already ended, or unreachable: nothing more to do here
                log.warning("could not stop Ray job %s: %s", run.job_id, exc)

    def log_fallback(self, run: Run, max_bytes: int) -> str:
        if not run.job_id:
            return ""
        try:
            return client().get_job_logs(run.job_id)[-max_bytes:]
        except Exception:
            return ""

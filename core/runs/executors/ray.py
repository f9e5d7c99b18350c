"""The Ray executor: each run is a Ray job on the cluster at Ray's own RAY_ADDRESS (the head's
dashboard URL, e.g. http://head:8265), submitted with `ray.job_submission.JobSubmissionClient`.

The entrypoint is the same worker command as locally, plus `--claim`: the cluster's scheduler
queues the job until a node has the CPUs, GPU share and memory it asks for (`job_request`),
and the worker moves its run from queued to running when it starts. The job's submission id
is the run id (a resumed run gets the run id plus its attempt number, since Ray never reuses
an id). The store URL (without its password: that comes from PostgreSQL's own PGPASSFILE or
service file on each node), the data directory and the artifact root travel in the job's
environment; there is no working_dir: every node has the project installed at the same path
(README "Run on a cluster").

The cluster's health is part of the state: every look at the head (a submit, the
supervisor's poll, `core runs`, the sidebar) records whether it answered in the store's
ray-cluster.json, so "unreachable since 11:40:02 at http://head:8265" is known to all. A
worker watches its cluster too (`watch_cluster`): when the head is gone it records why and
stops between batches, resumable from its last completed epoch.

Ray is imported lazily: `ray[default]` is an optional extra (requirements-cluster.txt).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from functools import cache
from typing import TYPE_CHECKING

from core.atomic import atomic_write_json
from core.config import RunConfig
from core.engine.paths import DATA_ROOTS_ENV
from core.process import CPU_RESERVATION_ENV
from core.runs.executors.base import PROJECT_ROOT, Verdict, liveness_problem, worker_command
from core.runs.store import DB_ENV, Run, RunStore

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

log = logging.getLogger("finetune_lab.jobs")
RAY_ADDRESS_ENV = "RAY_ADDRESS"  # Ray's own setting, read by every Ray tool
# The dashboard URL the run was submitted to, in the job's environment (Ray replaces the
# job's RAY_ADDRESS with the head's GCS address, host:port): the address messages name.
SUBMITTED_TO_ENV = "FINETUNE_LAB_RAY_ADDRESS"
# Settings besides the store's own (RunStore.environment) that a worker on another node
# needs: where it may read data sets, where torchvision keeps ImageNet weights, and where
# libpq finds the store's password (paths, never the password itself).
FORWARDED_ENV = (DATA_ROOTS_ENV, "TORCH_HOME", "PGPASSFILE", "PGSERVICEFILE", "PGSERVICE")
# Ray's terminal job states; PENDING and RUNNING are the others.
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PROBE_TIMEOUT_S = 2.0  # a head that has not answered in this long counts as unreachable
PROBE_CACHE_S = 2.0  # one process asks the head at most this often, seconds
# A worker's cluster is lost when its head has not answered for this long (seconds): long
# enough to ride out a busy head, well inside Ray's own 60 s before a node's raylet gives
# up on a lost head and its jobs are killed without a word.
LOST_AFTER_S = 10.0
WATCH_S = 2.0  # how often a worker looks at its head, seconds
# GPU share a run asks for by input size (px): a 32 px ResNet-18 batch keeps a fraction
# of a GPU busy and holds well under 1 GB, so four share one; 224 px takes a whole one.
GPU_SHARES = ((64, 0.25), (128, 0.5))


class RayUnavailable(RuntimeError):
    """The cluster cannot be reached, or Ray is not installed."""


# ---------------------------------------------------------------- the head and its health


def address() -> str:
    """The dashboard URL new runs go to ($RAY_ADDRESS), or RayUnavailable saying to set it."""
    url = os.environ.get(RAY_ADDRESS_ENV)
    if not url:
        raise RayUnavailable(f"set {RAY_ADDRESS_ENV} to the Ray head's dashboard URL "
                             f"(e.g. http://head:8265) to run on a cluster")
    return url


def _http_url(url: str) -> str:
    return url if "://" in url else f"http://{url}"


def _get_json(url: str, path: str, timeout_s: float = PROBE_TIMEOUT_S):
    with urllib.request.urlopen(_http_url(url).rstrip("/") + path, timeout=timeout_s) as resp:
        return json.load(resp)


_last_probe: dict[str, tuple[float, str | None]] = {}


def probe(url: str) -> str | None:
    """Why the head at `url` does not answer (its dashboard's /api/version, within
    PROBE_TIMEOUT_S), or None when it does. Asked at most every PROBE_CACHE_S per process,
    so a page or a loop over runs never waits on a dead head more than once."""
    now = time.monotonic()
    seen = _last_probe.get(url)
    if seen is not None and now - seen[0] < PROBE_CACHE_S:
        return seen[1]
    try:
        _get_json(url, "/api/version")
        problem = None
    except (OSError, ValueError) as exc:  # URLError, timeouts and refusals are OSErrors
        reason = getattr(exc, "reason", None) or exc
        problem = str(reason).removeprefix("<urlopen error ").removesuffix(">")
    _last_probe[url] = (time.monotonic(), problem)
    return problem


@dataclass(frozen=True)
class ClusterHealth:
    """The last look at the Ray head: whether it answered, and since when that is so."""

    address: str
    reachable: bool
    since: float  # when it started answering, or stopped (seconds since the epoch)
    checked_at: float
    problem: str = ""

    def notice(self, short: bool = False) -> str | None:
        """What `core runs` (and, `short`, the dashboard's sidebar) says while the head is
        unreachable, or None."""
        if self.reachable:
            return None
        when = time.strftime("%H:%M:%S %Z", time.localtime(self.since))
        first = (f"The Ray cluster at {self.address} is unreachable since {when} "
                 f"({_duration(time.time() - self.since)}")
        if short:
            return f"{first}): runs on it cannot start or report."
        return (f"{first}; {self.problem}). Runs on it cannot start or report. Start its "
                f"head again (ray start --head on that machine) or point {RAY_ADDRESS_ENV} at "
                f"a running one; runs it lost can then be resumed.")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    return f"{seconds // 60} min" if seconds < 7200 else f"{seconds // 3600} h"


def read_health(store: RunStore) -> ClusterHealth | None:
    try:
        return ClusterHealth(**json.loads(store.layout.cluster_health.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def record_health(store: RunStore, url: str, problem: str | None) -> ClusterHealth:
    """Write what a look at the head found; `since` moves only when the answer changes."""
    now = time.time()
    before = read_health(store)
    reachable = problem is None
    since = (before.since if before is not None and before.address == url
             and before.reachable == reachable else now)
    health = ClusterHealth(url, reachable, since, now, problem or "")
    try:
        atomic_write_json(store.layout.cluster_health, asdict(health))
    except OSError as exc:  # a read-only store folder: the notice is lost, nothing else
        log.warning("could not record the Ray cluster's health: %s", exc)
    return health


def check_health(store: RunStore, url: str | None = None) -> ClusterHealth:
    """Look at the head now (cached PROBE_CACHE_S) and record what was found."""
    url = url or address()
    return record_health(store, url, probe(url))


def cluster_notice(store: RunStore, short: bool = False) -> str | None:
    """The line to show while the Ray cluster new runs go to (or the one last seen) does
    not answer; None when it does or no cluster is in use. A look at the head, no more."""
    url = os.environ.get(RAY_ADDRESS_ENV)
    health = check_health(store, url) if url else read_health(store)
    return health.notice(short) if health is not None else None


def reachable_client(store: RunStore | None = None) -> JobSubmissionClient:
    """The job client for the head at $RAY_ADDRESS, after a quick look that it answers (so
    a dead head fails in PROBE_TIMEOUT_S, not after Ray's 30 s of retries)."""
    url = address()
    problem = probe(url)
    if store is not None:
        record_health(store, url, problem)
    if problem is not None:
        raise RayUnavailable(f"the Ray cluster at {url} is unreachable ({problem}): start its "
                             f"head (ray start --head) or set {RAY_ADDRESS_ENV} to a running "
                             f"one; nothing was queued")
    return client()


@cache
def _client(url: str) -> JobSubmissionClient:
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:
        raise RayUnavailable("the Ray executor needs ray[default]: pip install -r "
                             "requirements-cluster.txt") from exc
    try:
        return JobSubmissionClient(url)
    except Exception as exc:  # Ray raises ConnectionError/RuntimeError/ValueError here
        raise RayUnavailable(f"cannot reach the Ray cluster at {url}: {exc}") from exc


def client() -> JobSubmissionClient:
    url = address()
    if probe(url) is not None:  # Ray's client would retry for 30 s first
        raise RayUnavailable(f"the Ray cluster at {url} is unreachable: {probe(url)}")
    return _client(url)


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


# ---------------------------------------------------------------- resources


@dataclass(frozen=True)
class NodeResources:
    """What one alive node of the cluster offers Ray's scheduler."""

    name: str
    cpus: float
    gpus: float
    memory: float  # bytes

    def describe(self) -> str:
        gpus = f"{self.gpus:g} GPU" if self.gpus else "no GPU"
        return f"{self.name}: {self.cpus:g} CPU, {gpus}, {self.memory / 1024**3:.1f} GB memory"


@dataclass(frozen=True)
class JobRequest:
    """What a run's job asks the scheduler for: CPUs (= its torch threads), a GPU share and
    memory (bytes, core.runs.preflight.memory_estimate)."""

    cpus: float
    gpus: float
    memory: int

    def fits(self, node: NodeResources) -> bool:
        return (node.cpus >= self.cpus and node.gpus >= self.gpus
                and node.memory >= self.memory)

    def describe(self) -> str:
        gpus = f", {self.gpus:g} GPU" if self.gpus else ""
        return f"{self.cpus:g} CPU{gpus}, {self.memory / 1024**3:.1f} GB memory"


def cluster_nodes(url: str | None = None) -> list[NodeResources]:
    """The alive nodes of the cluster and their total resources (Ray's state API, over
    the dashboard's HTTP)."""
    url = url or address()
    try:
        body = _get_json(url, "/api/v0/nodes?detail=1&limit=1000", timeout_s=10.0)
    except (OSError, ValueError) as exc:
        raise RayUnavailable(f"the Ray cluster at {url} did not list its nodes: {exc}") from exc
    nodes = []
    for node in body.get("data", {}).get("result", {}).get("result", []):
        if node.get("state") != "ALIVE":
            continue
        total = node.get("resources_total") or {}
        nodes.append(NodeResources(node.get("node_name") or node.get("node_ip") or "?",
                                   float(total.get("CPU", 0)), float(total.get("GPU", 0)),
                                   float(total.get("memory", 0))))
    return nodes


def gpu_share(resolution: int) -> float:
    """The GPU fraction a run at `resolution` px asks for (GPU_SHARES; larger: a whole one)."""
    return next((share for up_to, share in GPU_SHARES if resolution <= up_to), 1.0)


def job_request(cfg: RunConfig, memory: int, cluster_has_gpu: bool) -> JobRequest:
    """The job's reservation: CPUs = the run's threads (auto: one, and the worker then uses
    one: CPU_RESERVATION_ENV); a GPU share by resolution when it asks for cuda, or for auto
    on a cluster that has GPUs; `memory` bytes."""
    wants_gpu = cfg.device == "cuda" or (cfg.device == "auto" and cluster_has_gpu)
    return JobRequest(float(cfg.threads or 1), gpu_share(cfg.resolution) if wants_gpu else 0.0,
                      memory)


def unmet_request(request: JobRequest, nodes: list[NodeResources], url: str) -> str | None:
    """Why no node of the cluster can ever run a job asking `request`, naming what the
    cluster has; None when one can."""
    if any(request.fits(node) for node in nodes):
        return None
    have = "; ".join(node.describe() for node in nodes) or "no alive node"
    hint = (" Pick device auto or cpu, or add a node with a GPU" if request.gpus else
            " Lower the threads (CPU) or the images held in memory")
    return (f"no node of the Ray cluster at {url} can run this: it asks for "
            f"{request.describe()}, and the cluster has {have}.{hint}.")


def check_submit(store: RunStore, cfg: RunConfig, memory: int) -> None:
    """Refuse (RayUnavailable) a run the cluster cannot take now: an unreachable head, or
    a request no node can satisfy. Called at submit, before the run exists."""
    url = address()
    reachable_client(store)
    nodes = cluster_nodes(url)
    problem = unmet_request(job_request(cfg, memory, any(n.gpus for n in nodes)), nodes, url)
    if problem:
        raise RayUnavailable(problem)


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


def job_environment(store: RunStore) -> dict[str, str]:
    """The job's environment: the store (its URL without the password), the forwarded
    settings, the project on PYTHONPATH. Nothing in it is secret: Ray's dashboard shows it."""
    from sqlalchemy.engine import URL, make_url

    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    env |= store.environment()  # the store URL, data directory, artifact root
    if env.get(DB_ENV):
        url = make_url(env[DB_ENV])  # rebuilt without it (URL.set(password=None) keeps it)
        env[DB_ENV] = URL.create(url.drivername, username=url.username, host=url.host,
                                 port=url.port, database=url.database, query=url.query
                                 ).render_as_string(hide_password=False)
    return env | {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(PROJECT_ROOT)}


# ---------------------------------------------------------------- the executor


class RayExecutor:
    name = "ray"
    poll_s = 2.0  # one request to the Ray dashboard per active run per look

    def dispatch(self, store: RunStore) -> list[str]:
        """Submit every queued run that has no live job yet; the cluster queues them."""
        submitted = []
        queued = [r for r in reversed(store.list_runs(statuses=("queued",)))]  # oldest first
        if not queued:
            return submitted
        reachable_client(store)  # RayUnavailable, recorded, when the head does not answer
        has_gpu = any(n.gpus for n in cluster_nodes())
        for run in queued:
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
                self._submit(store, run, job_id, has_gpu)
            except RayUnavailable:
                raise
            except Exception as exc:
                if "already exists" in str(exc):
                    continue  # another dispatcher submitted this attempt
                store.finish_run(run.id, "failed", f"Ray refused the job: {exc}")
                continue
            submitted.append(run.id)
        return submitted

    def _submit(self, store: RunStore, run: Run, job_id: str, cluster_has_gpu: bool) -> None:
        from core.runs.preflight import run_memory_estimate

        request = job_request(run.config, run_memory_estimate(run.config), cluster_has_gpu)
        env = job_environment(store) | {
            CPU_RESERVATION_ENV: f"{request.cpus:g}",  # the worker's threads = its CPUs
            SUBMITTED_TO_ENV: address()}
        try:
            client().submit_job(
                entrypoint=shlex.join(worker_command(run.id, store, claim=True)),
                submission_id=job_id, runtime_env={"env_vars": env},
                entrypoint_num_cpus=request.cpus, entrypoint_num_gpus=request.gpus,
                entrypoint_memory=request.memory,
                metadata={"run_id": run.id, "name": run.name[:200]})
        except OSError as exc:
            raise RayUnavailable(str(exc)) from exc
        log.info("run %s submitted to Ray as job %s (%s)", run.id, job_id, request.describe())

    def verdict(self, run: Run, now: float) -> Verdict | None:
        """Ray's word on the run's job first (it knows why a job ended), then the worker's
        process or heartbeat. A cluster that cannot be reached settles nothing by itself;
        a run found dead meanwhile is said to be lost with it."""
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
        if info == "unknown":
            if run.status == "running" and (problem := liveness_problem(run, now)):
                return Verdict("failed", lost_message(os.environ.get(RAY_ADDRESS_ENV) or "?",
                                                      now) + f" ({problem})")
            return None
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


# ---------------------------------------------------------------- inside the worker


def lost_message(url: str, since: float) -> str:
    """A run's error when its cluster went away: where, when, what to do."""
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(since))
    return (f"the Ray cluster at {url} was lost at {when}; its last completed epoch is saved: "
            f"resume the run when the cluster is back")


def _gcs_answers(gcs: str) -> bool:
    """Whether the head's GCS port (host:port, Ray's RAY_ADDRESS inside a job) accepts a
    connection: the head process itself, not only its machine."""
    host, _, port = gcs.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), PROBE_TIMEOUT_S):
            return True
    except (OSError, ValueError):
        return False


class ClusterWatch:
    """A worker's look at its Ray head every WATCH_S; when the head has not answered for
    LOST_AFTER_S, the run is recorded failed with the reason (resumable) and the training
    loop is told to stop between batches. A checkpoint being written completes first (the
    loop checks only between batches, and every file is written atomically), so nothing is
    half written; the last completed epoch is already on disk."""

    def __init__(self, store: RunStore, run_id: str, gcs: str, url: str):
        self.store, self.run_id, self.gcs, self.url = store, run_id, gcs, url
        self.lost_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ray-cluster-watch",
                                        daemon=True)

    def start(self) -> ClusterWatch:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        from core.runs.recorder import TERMINATED

        first_miss: float | None = None
        while not self._stop.wait(WATCH_S):
            if self._settled_elsewhere():
                TERMINATED.set()  # no second writer beside a resumed attempt
                return
            if _gcs_answers(self.gcs):
                first_miss = None
                continue
            first_miss = first_miss or time.time()
            if time.time() - first_miss < LOST_AFTER_S:
                continue
            self.lost_at = first_miss
            message = lost_message(self.url, first_miss)
            log.error("%s", message)
            try:
                self.store.finish_run(self.run_id, "failed", message, only_if_running=True)
            except Exception as exc:  # a store on the lost head: the log keeps the reason
                log.error("could not record the loss in the run store: %s", exc)
            TERMINATED.set()
            return


    def _settled_elsewhere(self) -> bool:
        """Whether the run was settled while this worker still runs: a head restarted
        within LOST_AFTER_S answers again but no longer knows this job, and the supervisor
        then records the run failed ("the Ray cluster does not know job ..."); the worker
        must stop, or a resume would train beside it."""
        try:
            run = self.store.get_run(self.run_id)
        except Exception:  # a store outage is the store's business (it retries)
            return False
        if run is None or run.status == "running":
            return False
        log.error("the run was settled as %s by someone else (%s): stopping", run.status,
                  run.error or "no reason given")
        return True


def watch_cluster(store: RunStore, run_id: str) -> ClusterWatch | None:
    """Start watching the head of the Ray job this worker runs in; None outside a job."""
    gcs = os.environ.get(RAY_ADDRESS_ENV, "")
    if not gcs or "://" in gcs or ":" not in gcs:
        return None  # not started by a Ray job (Ray sets host:port of the head here)
    return ClusterWatch(store, run_id, gcs, os.environ.get(SUBMITTED_TO_ENV) or gcs).start()

"""The Ray executor against a real Ray head (FINETUNE_LAB_TEST_RAY, its job-submission URL)
and a PostgreSQL store (FINETUNE_LAB_TEST_PG); scripts/with_services.sh starts both on
loopback. Runs submitted through jobs.submit, the New run page's code path, execute as Ray
jobs; cancel, faults behind our back and resume.

Skipped without a head or PostgreSQL; in CI (CI set) a missing one fails instead."""

from __future__ import annotations

import os
import signal
from dataclasses import replace

import pytest

from core import config as cfgmod
from core.runs import jobs, supervisor
from core.runs.executors.ray import JobRequest, job_request
from core.runs.preflight import run_memory_estimate
from tests.conftest import tiny_config, wait_for
from tests.ray_support import ray_head_url, write_pgpass

RAY_URL = ray_head_url()

pytestmark = pytest.mark.slow


@pytest.fixture
def store(pg_store):
    """Every test here on PostgreSQL, as a cluster uses it (conftest's pg_store)."""
    return pg_store


@pytest.fixture
def ray_env(monkeypatch, store, tmp_path):
    """The executor switched to the test's Ray head; every job of the test stopped after."""
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setenv(jobs.EXECUTOR_ENV, "ray")
    monkeypatch.setenv("RAY_ADDRESS", RAY_URL)
    # Jobs carry the store URL without its password: nodes read it from a pgpass file.
    monkeypatch.setenv("PGPASSFILE", str(write_pgpass(store.url, tmp_path)))
    client = JobSubmissionClient(RAY_URL)
    yield client
    for run in store.list_runs(statuses=("running",)):
        jobs.kill(store, run.id)
    for run in store.list_runs(statuses=("queued",)):
        jobs.cancel(store, run.id)
    wait_for(lambda: not supervisor.is_running(store), 60, "the supervisor to exit")


def _long_config(tiny_folder, epochs=200):
    return cfgmod.with_stage(tiny_config(tiny_folder, batch_size=4), 0, epochs=epochs)


def _ended(store, run_id):
    return store.get_run(run_id).status in ("finished", "failed", "cancelled")


def test_a_run_submitted_like_the_new_run_page_finishes_as_a_ray_job(store, tiny_folder, ray_env):
    run = jobs.submit(store, tiny_config(tiny_folder), name="on ray")
    assert (run.executor, run.job_id) == ("ray", run.id)  # the submission id is the run id
    wait_for(lambda: _ended(store, run.id), 240, "the Ray job to finish")
    final = store.get_run(run.id)
    assert final.status == "finished", (final.error, jobs.log_tail(store, run.id))
    assert {m.stage for m in store.metrics(run.id, keys=["val/acc"])} == {1, 2}
    assert final.test_acc is not None and final.host
    # The store is settled first; the job ends when the worker process exits after it.
    wait_for(lambda: ray_env.get_job_status(run.id).value != "RUNNING", 60, "the job to end")
    assert ray_env.get_job_status(run.id).value == "SUCCEEDED"
    info = ray_env.get_job_info(run.id)
    assert "core.runs.worker" in info.entrypoint and "--claim" in info.entrypoint
    assert info.runtime_env["env_vars"]["FINETUNE_LAB_DATA"] == str(store.root)
    # threads=1 on cpu: one CPU, no GPU, the preflight's memory estimate
    assert job_request(final.config, run_memory_estimate(final.config), False) == \
        JobRequest(1.0, 0.0, run_memory_estimate(final.config))
    assert "finetune_test@" in info.runtime_env["env_vars"]["FINETUNE_LAB_DB"]
    assert ":finetune_test@" not in str(info.runtime_env)  # the password stays off Ray
    assert job_request(replace(final.config, threads=4, device="cuda"), 2**30, False) == \
        JobRequest(4.0, 0.25, 2**30)  # 32 px: a quarter of a GPU
    assert job_request(replace(final.config, resolution=224, device="auto"), 1, True).gpus == 1
    # One log for both executors: the worker's own file in the run's folder.
    assert "finished: best val acc" in store.files(run.id).log.read_text()
    assert "finished: best val acc" in jobs.log_tail(store, run.id)


def test_cancel_through_the_dashboard_ends_cancelled(store, tiny_folder, ray_env):
    run = jobs.submit(store, _long_config(tiny_folder))
    wait_for(lambda: store.get_run(run.id).progress.phase == "training", 240, "training")
    jobs.cancel(store, run.id)
    wait_for(lambda: _ended(store, run.id), 120, "the run to stop")
    final = store.get_run(run.id)
    assert final.status == "cancelled", final.error
    wait_for(lambda: ray_env.get_job_status(run.id).value in ("SUCCEEDED", "STOPPED"), 60,
             "the job to end")


def test_a_queued_run_cancelled_before_it_starts_stops_its_job(store, tiny_folder, ray_env):
    first = jobs.submit(store, _long_config(tiny_folder))  # holds the head's one CPU
    second = jobs.submit(store, tiny_config(tiny_folder))
    wait_for(lambda: store.get_run(first.id).status == "running", 240, "the first run")
    # The cluster queues the second (no CPU free), so the store still says queued.
    assert ray_env.get_job_status(second.id).value == "PENDING"
    assert store.get_run(second.id).status == "queued"
    assert jobs.cancel(store, second.id).status == "cancelled"
    # Ray holds the stop until the job's supervisor gets the CPU; then it never trains.
    jobs.kill(store, first.id)
    assert store.get_run(first.id).status == "cancelled"
    wait_for(lambda: ray_env.get_job_status(second.id).value in ("STOPPED", "FAILED"), 120,
             "the pending job to be stopped")
    never_ran = store.get_run(second.id)
    assert never_ran.status == "cancelled" and never_ran.started_at is None
    assert store.metrics(second.id) == []


def test_a_killed_job_ends_failed_with_the_reason_and_resumes(store, tiny_folder, ray_env):
    run = jobs.submit(store, _long_config(tiny_folder, epochs=3))
    last = store.files(run.id).last
    wait_for(lambda: last.exists() and store.get_run(run.id).best_checkpoint, 240,
             "a first completed epoch")
    os.kill(store.get_run(run.id).pid, signal.SIGKILL)  # the OOM killer, a dying node
    # No page and no call of ours settles it: the supervisor asks Ray.
    wait_for(lambda: store.get_run(run.id).status == "failed", 60, "the failure to be seen")
    failed = store.get_run(run.id)
    assert f"Ray job {run.id} failed" in failed.error and "resumed" in failed.error
    epochs_before = {m.epoch for m in store.metrics(run.id, keys=["val/acc"])}

    resumed = jobs.resume(store, run.id)
    assert resumed.job_id == f"{run.id}-2"  # Ray never reuses a submission id
    wait_for(lambda: _ended(store, run.id), 240, "the resumed run")
    final = store.get_run(run.id)
    assert final.status == "finished", (final.error, jobs.log_tail(store, run.id))
    epochs = [m.epoch for m in store.metrics(run.id, keys=["val/acc"])]
    assert epochs == sorted(set(epochs)) and set(epochs) == {1.0, 2.0, 3.0, 4.0}
    assert epochs_before <= set(epochs)
    assert "resuming after epoch" in jobs.log_tail(store, run.id)


def test_a_job_stopped_behind_our_back_ends_failed(store, tiny_folder, ray_env):
    run = jobs.submit(store, _long_config(tiny_folder))
    wait_for(lambda: store.get_run(run.id).progress.phase == "training", 240, "training")
    ray_env.stop_job(run.id)  # not through the lab: no cancel request in the store
    wait_for(lambda: _ended(store, run.id), 120, "the run to end")
    final = store.get_run(run.id)
    assert final.status == "failed" and "stopped" in final.error, final.error


def test_a_job_that_ignores_cancel_is_stopped_after_the_grace_period(store, tiny_folder,
                                                                       ray_env):
    """A worker that cannot honour a cancel (here frozen with SIGSTOP: a hung data read, a
    stuck collective) is stopped through Ray once the supervisor's grace period is over,
    and the run ends cancelled, not failed."""
    run = jobs.submit(store, _long_config(tiny_folder))
    wait_for(lambda: store.get_run(run.id).progress.phase == "training", 240, "training")
    os.kill(store.get_run(run.id).pid, signal.SIGSTOP)
    jobs.cancel(store, run.id)
    assert store.get_run(run.id).status == "running"  # asked, not honoured
    wait_for(lambda: _ended(store, run.id), supervisor.CANCEL_GRACE_S + 90,
             "the supervisor to stop the job")
    final = store.get_run(run.id)
    assert final.status == "cancelled", final.error
    assert f"Ray stopped job {run.job_id}" in final.error
    assert ray_env.get_job_status(run.id).value == "STOPPED"

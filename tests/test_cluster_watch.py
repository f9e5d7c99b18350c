"""A Ray worker's watch on its cluster (core.runs.executors.ray.ClusterWatch), with a real
socket standing in for the head's GCS port: a head that stops answering ends the run as
failed with where and when, resumable; a run settled by someone else (a head restarted
that forgot the job) stops its worker, so a resume never trains beside it. The same path
against real Ray heads: tests/test_ray_cluster_faults.py."""

from __future__ import annotations

import os
import socket

import pytest

from core.runs.executors import ray as ray_executor
from core.runs.recorder import TERMINATED
from tests.conftest import tiny_config, wait_for


@pytest.fixture
def fast_watch(monkeypatch):
    monkeypatch.setattr(ray_executor, "WATCH_S", 0.05)
    monkeypatch.setattr(ray_executor, "LOST_AFTER_S", 0.5)
    TERMINATED.clear()
    yield
    TERMINATED.clear()


@pytest.fixture
def gcs():
    """A listening loopback socket: a head's GCS port that answers until closed."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield server
    server.close()


def _running_run(store, tiny_folder):
    run = store.create_run(tiny_config(tiny_folder))
    store.claim_run_now(run.id, os.getpid())
    return run


def test_a_head_that_stops_answering_fails_the_run_resumably(store, tiny_folder, gcs,
                                                             fast_watch):
    run = _running_run(store, tiny_folder)
    address = f"127.0.0.1:{gcs.getsockname()[1]}"
    watch = ray_executor.ClusterWatch(store, run.id, address, "http://head:8265").start()
    try:
        wait_for(lambda: watch._thread.is_alive(), 10, "the watch")
        assert not TERMINATED.wait(0.3)  # it answers: nothing happens
        assert store.get_run(run.id).status == "running"
        gcs.close()  # the head is gone
        wait_for(TERMINATED.is_set, 30, "the worker to be told to stop")
    finally:
        watch.close()
    failed = store.get_run(run.id)
    assert failed.status == "failed"
    assert failed.error.startswith("the Ray cluster at http://head:8265 was lost at ")
    assert failed.error.endswith("resume the run when the cluster is back")


def test_a_run_settled_elsewhere_stops_its_worker(store, tiny_folder, gcs, fast_watch):
    run = _running_run(store, tiny_folder)
    address = f"127.0.0.1:{gcs.getsockname()[1]}"
    watch = ray_executor.ClusterWatch(store, run.id, address, "http://head:8265").start()
    try:
        assert not TERMINATED.wait(0.3)
        store.finish_run(run.id, "failed", "the Ray cluster does not know job X",
                         only_if_running=True)
        wait_for(TERMINATED.is_set, 30, "the worker to be told to stop")
    finally:
        watch.close()
    assert store.get_run(run.id).error == "the Ray cluster does not know job X"  # kept


def test_no_watch_outside_a_ray_job(store, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_executor.watch_cluster(store, "any") is None
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")  # a submitter's, not a job's
    assert ray_executor.watch_cluster(store, "any") is None

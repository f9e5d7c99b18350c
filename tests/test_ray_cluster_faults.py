"""A cluster whose parts fail (issue 17): a Ray head lost mid-run, a GPU run on a cluster
without GPUs, jobs whose threads match their CPU reservation. Real parts: a PostgreSQL store
(FINETUNE_LAB_TEST_PG), the shared Ray head (FINETUNE_LAB_TEST_RAY) and Ray heads of the
tests' own, started and killed here on other ports (scripts/with_services.sh provides the
first two).

Skipped without a head or PostgreSQL; in CI (CI set) a missing one fails instead."""

from __future__ import annotations

import os

import pytest

from core import config as cfgmod
from core.cli import main
from core.runs import jobs, supervisor
from core.runs.preflight import ExecutorUnavailable
from tests.conftest import tiny_config, wait_for
from tests.ray_support import OwnRayHead, write_pgpass

RAY_URL = os.environ.get("FINETUNE_LAB_TEST_RAY")
if not RAY_URL:
    if os.environ.get("CI"):
        raise RuntimeError("CI is set but FINETUNE_LAB_TEST_RAY is not: start a Ray head "
                           "(scripts/with_services.sh) for the cluster tests")
    pytest.skip("no Ray head: set FINETUNE_LAB_TEST_RAY (scripts/with_services.sh does)",
                allow_module_level=True)

# A head of a test's own takes up to minutes to start on a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture
def store(pg_store, tmp_path, monkeypatch):
    """PostgreSQL, as a cluster uses it, its password in a pgpass file (jobs never carry
    it), the executor set to Ray."""
    monkeypatch.setenv("PGPASSFILE", str(write_pgpass(pg_store.url, tmp_path)))
    monkeypatch.setenv("FINETUNE_LAB_DB", pg_store.url)  # the command line's store too
    monkeypatch.setenv(jobs.EXECUTOR_ENV, "ray")
    monkeypatch.setenv("RAY_ADDRESS", RAY_URL)
    yield pg_store
    for run in pg_store.list_runs(statuses=("running",)):
        jobs.kill(pg_store, run.id)
    for run in pg_store.list_runs(statuses=("queued",)):
        jobs.cancel(pg_store, run.id)
    wait_for(lambda: not supervisor.is_running(pg_store), 60, "the supervisor to exit")


@pytest.fixture
def own_head(request):
    """Start a Ray head of the test's own: own_head(cpus, port)."""
    heads = []

    def start(cpus: int, port: int) -> OwnRayHead:
        for attempt in range(3):  # Ray's own start-up times out on a machine at load 30
            heads.append(OwnRayHead(cpus, port, port + 1900))
            try:
                return heads[-1].wait_ready()
            except AssertionError:
                heads.pop().close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    yield start
    for head in heads:
        head.close()


def _long_config(folder, **changes):
    return cfgmod.with_stage(tiny_config(folder, batch_size=4, **changes), 0, epochs=200)


def test_a_gpu_run_on_a_cluster_without_gpus_is_refused_naming_its_resources(store,
                                                                             tiny_folder,
                                                                             capsys):
    with pytest.raises(ExecutorUnavailable) as refused:
        jobs.submit(store, tiny_config(tiny_folder, device="cuda"))
    message = str(refused.value)
    assert f"no node of the Ray cluster at {RAY_URL} can run this" in message
    assert "asks for 1 CPU, 0.25 GPU" in message  # 32 px: a quarter of a GPU
    assert "127.0.0.1: 1 CPU, no GPU" in message and "GB memory" in message
    assert store.list_runs() == []  # refused before a run existed: nothing waits forever
    code = main(["--data-dir", str(store.root), "submit", "--data-source", "folder",
                 "--data-path", str(tiny_folder), "--weights", "random", "--epochs", "1",
                 "--resolution", "224", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("cannot submit:")
    assert "asks for 1 CPU, 1 GPU" in err and "no GPU" in err  # 224 px: a whole GPU
    assert store.list_runs() == []

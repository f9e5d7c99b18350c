"""A GPU run on a cluster without GPUs (issue 17) is refused at submit, naming the cluster's
resources. Real parts: a PostgreSQL store (FINETUNE_LAB_TEST_PG) and the shared Ray head
(FINETUNE_LAB_TEST_RAY); scripts/with_services.sh provides both. A head lost mid-run and jobs
whose threads match their reservation: tests/test_ray_head_loss.py.

Skipped without a head or PostgreSQL; in CI (CI set) a missing one fails instead."""

from __future__ import annotations

import pytest

from core.cli import main
from core.runs import jobs
from core.runs.preflight import ExecutorUnavailable
from tests.conftest import tiny_config
from tests.ray_support import ray_head_url, ray_store_fixture

RAY_URL = ray_head_url()

# A head of a test's own takes up to minutes to start on a loaded 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


store = ray_store_fixture(RAY_URL)


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

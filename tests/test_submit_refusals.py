"""Submits that where they would run cannot take are refused at once, before a run exists,
with what to do (issue 17.3, 22.8): a Ray head that does not answer (no 30 s wait, never
"invalid config"), a device this machine does not have. No services needed."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from core.cli import main
from core.runs import jobs
from core.runs.preflight import ExecutorUnavailable
from tests.conftest import tiny_config


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_submit_while_the_ray_head_is_down_is_refused_at_once(store, tiny_folder,
                                                                 monkeypatch, capsys):
    url = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv(jobs.EXECUTOR_ENV, "ray")
    monkeypatch.setenv("RAY_ADDRESS", url)
    t0 = time.monotonic()
    with pytest.raises(ExecutorUnavailable) as refused:
        jobs.submit(store, tiny_config(tiny_folder))
    assert time.monotonic() - t0 < 25  # preflight included; Ray's own client waited 30 s
    message = str(refused.value)
    assert f"the Ray cluster at {url} is unreachable" in message
    assert "ray start --head" in message and "nothing was queued" in message
    assert store.list_runs() == []  # nothing queued, no "on no host yet"

    # The command line says the same, as a submit refusal, not as a config problem.
    code = main(["--data-dir", str(store.root), "submit", "--data-source", "folder",
                 "--data-path", str(tiny_folder), "--weights", "random", "--epochs", "1",
                 "--threads", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("cannot submit:") and "invalid config" not in err
    assert f"{url} is unreachable" in err
    assert store.list_runs() == []

    # `core runs` says since when the cluster is unreachable, and where.
    assert main(["--data-dir", str(store.root), "runs"]) == 0
    err = capsys.readouterr().err
    assert f"The Ray cluster at {url} is unreachable since" in err
    assert jobs.cluster_notice(store).startswith(f"The Ray cluster at {url} is unreachable")


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS may have MPS")
def test_a_device_the_machine_lacks_is_refused_at_submit_naming_what_it_has(store, tiny_folder,
                                                                           capsys):
    from dataclasses import replace

    with pytest.raises(ExecutorUnavailable) as refused:
        jobs.submit(store, replace(tiny_config(tiny_folder), device="mps"))
    message = str(refused.value)
    assert "device: mps was chosen but this machine has no Apple MPS; it has cpu (" in message
    assert store.list_runs() == []
    # The foreground CLI run too, before a run exists.
    code = main(["--data-dir", str(store.root), "train", "--data-source", "folder",
                 "--data-path", str(tiny_folder), "--weights", "random", "--epochs", "1",
                 "--device", "mps"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot submit:" in err and "no Apple MPS; it has cpu (" in err
    assert store.list_runs() == []


def test_cuda_is_refused_where_there_is_none_and_accepted_where_there_is(store, tiny_folder):
    import torch

    cfg = tiny_config(tiny_folder, device="cuda")
    if torch.cuda.is_available():
        assert jobs.submit(store, cfg, start=False).status == "queued"
        return
    with pytest.raises(ExecutorUnavailable, match="no CUDA GPU; it has cpu"):
        jobs.submit(store, cfg)
    assert store.list_runs() == []


def test_a_jobs_environment_carries_the_store_url_without_its_password(tmp_path, monkeypatch):
    """Ray shows a job's environment on its dashboard: the password stays out of it (each
    node's libpq reads it from PGPASSFILE, forwarded as a path)."""
    from core.runs.executors.ray import job_environment
    from core.runs.store import RunStore

    class PostgresStore(RunStore):  # the URL a PostgreSQL store would hand a worker
        def environment(self) -> dict[str, str]:
            return super().environment() | {
                "FINETUNE_LAB_DB": "postgresql+psycopg://lab:s3cret@db:5432/lab?sslmode=require"}

    monkeypatch.setenv("PGPASSFILE", "/mnt/shared/.pgpass")
    env = job_environment(PostgresStore(tmp_path / "runs"))
    assert env["FINETUNE_LAB_DB"] == "postgresql+psycopg://lab@db:5432/lab?sslmode=require"
    assert "s3cret" not in str(env) and env["PGPASSFILE"] == "/mnt/shared/.pgpass"

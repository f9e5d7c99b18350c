"""The recipe search on a cluster's parts: the run store and Optuna's study both in one
PostgreSQL database, every trial a Ray job (FINETUNE_LAB_EXECUTOR=ray), the driver a local
process as on one machine.

Needs a Ray head (FINETUNE_LAB_TEST_RAY) and a PostgreSQL server (FINETUNE_LAB_TEST_PG);
scripts/with_services.sh starts both on loopback:

  bash scripts/with_services.sh .venv/bin/python -m pytest -q tests/test_search_cluster.py

Skipped without them; in CI (CI set) a missing one fails instead.
"""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa

from core.analysis import search as searchmod
from core.runs import jobs, search_driver, supervisor
from core.runs.store import RunStore
from tests.browser_support import stop_active_runs
from tests.conftest import postgres_database, tiny_config, wait_for
from tests.ray_support import write_pgpass

RAY_ENV, PG_ENV = "FINETUNE_LAB_TEST_RAY", "FINETUNE_LAB_TEST_PG"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _ray_url() -> str:
    missing = [name for name in (RAY_ENV, PG_ENV) if not os.environ.get(name)]
    if missing:
        message = (f"{' and '.join(missing)} not set: run under scripts/with_services.sh, which "
                   f"starts a Ray head and PostgreSQL on loopback")
        if os.environ.get("CI"):
            pytest.fail(f"CI runs the cluster search test: {message}", pytrace=False)
        pytest.skip(message)
    return os.environ[RAY_ENV]


def test_a_search_on_postgresql_runs_its_trials_as_ray_jobs(tmp_path, tiny_folder, monkeypatch):
    ray_url = _ray_url()
    with postgres_database() as db_url:
        # The Ray jobs get the store's password from a pgpass file, never from their environment.
        for name, value in {jobs.EXECUTOR_ENV: "ray", "RAY_ADDRESS": ray_url,
                            "FINETUNE_LAB_DB": db_url, "FINETUNE_LAB_MAX_JOBS": "1",
                            "PGPASSFILE": str(write_pgpass(db_url, tmp_path))}.items():
            monkeypatch.setenv(name, value)
        store = RunStore(tmp_path / "runs", url=db_url)
        space = (searchmod.SearchSpace().with_range("stages", (1, 1))
                 .with_range("epochs", (1, 2)))
        spec = searchmod.SearchSpec(name="on the cluster", base=tiny_config(tiny_folder),
                                    space=space, trials=3)
        sid = searchmod.create_search(store, spec)
        try:
            found = wait_for(lambda: (f := searchmod.summary(store, sid)).state != "running"
                             and f, 800, "the search to finish")
        finally:
            searchmod.request_stop(store, sid)
            stop_active_runs(store)
        assert found.state == "finished"
        assert sorted(t.number for t in found.trials) == [0, 1, 2]
        assert all(t.state in ("finished", "pruned") for t in found.trials), found.trials
        runs = store.list_runs(group=sid)
        assert sorted(r.id for r in runs) == sorted(t.run_id for t in found.trials)
        assert {(r.kind, r.executor) for r in runs} == {("trial", "ray")}
        assert all(r.job_id for r in runs)
        # The study is in the store's own PostgreSQL database, beside the runs.
        assert not store.is_sqlite
        with store.engine.connect() as con:
            names = [r[0] for r in con.execute(sa.text("SELECT study_name FROM studies"))]
        assert sid in names
        assert found.best is not None
        wait_for(lambda: not search_driver.is_running(store, sid), 60, "the driver to exit")
        wait_for(lambda: not supervisor.is_running(store), 120, "the supervisor to exit")

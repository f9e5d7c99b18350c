"""Shared fixtures: tiny generated image folders, a temporary run store, a finished run.

Everything is local and small: random weights, a few dozen 32x32 images, CPU only.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

# Tests never touch the network: torchvision would try to download otherwise.
os.environ.setdefault("TORCH_HOME", "/nonexistent-torch-home-for-tests")
# Tests choose their store themselves: a store URL or artifact root set in the shell must not
# send them to a real database or folder.
for _setting in ("FINETUNE_LAB_DB", "FINETUNE_LAB_ARTIFACTS"):
    os.environ.pop(_setting, None)

from core import config as cfgmod  # noqa: E402
from core.runs.store import RunStore  # noqa: E402

CLASSES = ("red", "green", "blue")
COLORS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 70, 210)}


def make_image_folder(root: Path, per_class: int = 12, classes=CLASSES, size: int = 32,
                      split: bool = True, seed: int = 0) -> Path:
    """Write a tiny learnable data set: each class a noisy solid colour with a stripe."""
    import random

    from PIL import Image

    rng = random.Random(seed)
    parts = (("train", per_class), ("test", max(2, per_class // 3))) if split else (("", per_class),)
    for part, n in parts:
        for c in classes:
            d = root / part / c if part else root / c
            d.mkdir(parents=True, exist_ok=True)
            base = COLORS.get(c, (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
            for i in range(n):
                img = Image.new("RGB", (size, size),
                                tuple(max(0, min(255, v + rng.randint(-30, 30))) for v in base))
                y = rng.randrange(size - 4)
                for x in range(size):
                    for dy in range(3):
                        img.putpixel((x, y + dy), (255, 255, 255))
                img.save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """train/ and test/ with 3 classes, 12 + 4 images each."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "colors")


@pytest.fixture
def store(tmp_path) -> RunStore:
    return RunStore(tmp_path / "runs")


# ---------------------------------------------------------------- PostgreSQL
# A server from FINETUNE_LAB_TEST_PG (scripts/with_services.sh starts one on loopback), whose
# role may CREATE DATABASE. Without it the PostgreSQL cases skip, except in CI, where a
# missing PostgreSQL fails them: CI must test both stores.

TEST_PG_ENV = "FINETUNE_LAB_TEST_PG"


def postgres_server() -> str:
    """The test server's URL, or skip (fail in CI) when there is none."""
    url = os.environ.get(TEST_PG_ENV)
    if url:
        return url
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is missing: {TEST_PG_ENV} is not set. CI runs the store tests "
                    f"on PostgreSQL too; run them under scripts/with_services.sh.", pytrace=False)
    pytest.skip(f"PostgreSQL not available (set {TEST_PG_ENV}, e.g. via scripts/with_services.sh)")


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A new, uniquely named database on the test server, dropped afterwards. Yields its
    URL in the plain postgresql:// form users write."""
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    from core.runs.store import database_url, dispose_engines

    server = database_url(postgres_server())
    name = f"finetune_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as con:
            con.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield server.set(drivername="postgresql", database=name).render_as_string(
                hide_password=False)
        finally:
            dispose_engines()  # this process's pooled connections to it
            with admin.connect() as con:
                con.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test module."""
    with postgres_database() as url:
        yield url


def empty_store_tables(store: RunStore) -> None:
    """Delete every row (the schema stays): a clean store in the module's database."""
    import sqlalchemy as sa

    from core.runs import store as store_module

    with store.engine.begin() as con:
        for table in reversed(store_module.metadata.sorted_tables):
            con.execute(sa.delete(table))


@pytest.fixture
def pg_store(pg_url, tmp_path) -> RunStore:
    """An empty run store on PostgreSQL, artifacts under a temporary folder."""
    store = RunStore(tmp_path / "runs", url=pg_url)
    empty_store_tables(store)
    return store


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request, tmp_path) -> RunStore:
    """An empty run store, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return RunStore(tmp_path / "runs")
    return request.getfixturevalue("pg_store")


def tiny_config(data_path: Path, **changes) -> cfgmod.RunConfig:
    """A two-stage config that trains in about a second on the tiny folder."""
    cfg = cfgmod.preset_config("Two-stage", epochs=1, lr=0.01, data_source="folder",
                               data_path=str(data_path), weights="random", batch_size=8,
                               val_fraction=0.25, threads=1, device="cpu")
    return replace(cfg, **changes)


def wait_for(predicate: Callable[[], object], timeout_s: float = 60.0, what: str = "condition"):
    """Poll `predicate` until it returns something truthy or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(delay)  # polling interval, not a wait for a fixed duration
        delay = min(0.25, delay * 1.5)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_folder):
    """(store, run): a real two-stage run trained in-process to completion."""
    from core.runs.worker import execute_run

    store = RunStore(tmp_path_factory.mktemp("finished") / "runs")
    run = store.create_run(tiny_config(tiny_folder), name="tiny finished")
    assert store.claim_run_now(run.id, os.getpid())
    assert execute_run(store, run.id) == "finished"
    return store, store.get_run(run.id)


@pytest.fixture
def app_env(tmp_path, monkeypatch, tiny_folder) -> RunStore:
    """For page tests: an empty store via FINETUNE_LAB_DATA and data roots that allow the
    tiny folder. Returns the store."""
    monkeypatch.setenv("FINETUNE_LAB_DATA", str(tmp_path / "runs"))
    monkeypatch.setenv("FINETUNE_LAB_DATA_ROOTS", str(tiny_folder.parent))
    return RunStore(tmp_path / "runs")


@pytest.fixture
def data_in_temp_roots(monkeypatch, tmp_path_factory) -> None:
    """Data roots that hold pytest's temp folders: the pages' analyses show only images under
    the data roots (core.engine.paths.shown_outside_roots), and tests keep data there."""
    monkeypatch.setenv("FINETUNE_LAB_DATA_ROOTS", str(tmp_path_factory.getbasetemp()))


@pytest.fixture
def no_workers(monkeypatch) -> list:
    """Submitted runs stay queued: no background training process is started. Returns the
    list of dispatch calls."""
    from core.runs import jobs

    started: list = []
    monkeypatch.setattr(jobs, "dispatch", lambda store: started.append(store) or [])
    return started

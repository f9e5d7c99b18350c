"""Issue 22.9: a store written by a newer version of the lab is refused in one line,
touching nothing: the command line and the pages say so instead of a traceback."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from streamlit.testing.v1 import AppTest

from core.config import RunConfig
from core.runs.store import SCHEMA_VERSION, NewerSchemaError, RunStore, StoreError

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = (f"this store was written by a newer version (schema 99, this one knows "
           f"{SCHEMA_VERSION}): upgrade")


def _newer_sqlite_store(root: Path) -> Path:
    """A store a future version wrote: schema 99, a column renamed."""
    store = RunStore(root)
    store.create_run(RunConfig(), name="from the future")
    with sqlite3.connect(store.db_path) as con:
        con.execute("ALTER TABLE runs RENAME COLUMN note TO remark")
        con.execute("PRAGMA user_version=99")
    return store.db_path


def _contents(db: Path) -> tuple[int, list[str]]:
    """The database's version and every schema statement and row (SQLite may fold its WAL
    into the file when a connection closes, which changes bytes, not contents)."""
    with sqlite3.connect(db) as con:
        return con.execute("PRAGMA user_version").fetchone()[0], list(con.iterdump())


def test_a_newer_sqlite_store_is_refused_in_one_line_and_left_untouched(tmp_path):
    db = _newer_sqlite_store(tmp_path / "runs")
    before = _contents(db)
    with pytest.raises(NewerSchemaError) as info:
        RunStore(tmp_path / "runs")
    assert str(info.value) == MESSAGE and isinstance(info.value, StoreError)
    assert _contents(db) == before and before[0] == 99
    assert "remark" in " ".join(before[1])  # the newer version's column, kept


def test_the_command_line_says_the_one_line(tmp_path):
    _newer_sqlite_store(tmp_path / "runs")
    out = subprocess.run([sys.executable, "-m", "core", "--data-dir", str(tmp_path / "runs"),
                          "runs"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip() == MESSAGE and "Traceback" not in out.stderr


@pytest.mark.parametrize("page", ["app_pages/overview.py", "app_pages/runs.py"])
def test_the_pages_say_the_one_line(tmp_path, monkeypatch, page):
    _newer_sqlite_store(tmp_path / "runs")
    monkeypatch.setenv("FINETUNE_LAB_DATA", str(tmp_path / "runs"))
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=120).run()
    if page != "app_pages/overview.py":
        at.switch_page(page).run()
    assert not at.exception, [e.value for e in at.exception]
    assert MESSAGE in [e.value for e in at.error]


def test_a_newer_postgresql_store_is_refused_untouched(pg_url, tmp_path):
    store = RunStore(tmp_path / "runs", url=pg_url)
    with store.engine.begin() as con:
        con.exec_driver_sql("UPDATE schema_version SET version=99")
    try:
        with pytest.raises(NewerSchemaError, match=r"^this store was written by a newer "
                                                   r"version \(schema 99, this one knows \d+\)"):
            RunStore(tmp_path / "runs", url=pg_url)
        with store.engine.connect() as con:
            assert con.execute(sa.text("SELECT version FROM schema_version")).scalar() == 99
    finally:
        with store.engine.begin() as con:
            con.exec_driver_sql(f"UPDATE schema_version SET version={SCHEMA_VERSION}")

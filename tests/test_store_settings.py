"""Settings (core/settings.py): the artifact root holds what runs write as files, the data
directory holds the SQLite store, and the engine layer reads its paths from settings, not
from the run store's package."""

from __future__ import annotations

import ast
from pathlib import Path

from core import settings
from core.config import RunConfig
from core.runs.store import RunStore

ROOT = Path(__file__).resolve().parent.parent


def test_artifacts_live_under_the_artifact_root_and_the_database_in_the_data_dir(
        tmp_path, monkeypatch):
    monkeypatch.setenv(settings.DATA_DIR_ENV, str(tmp_path / "data"))
    monkeypatch.setenv(settings.ARTIFACTS_ENV, str(tmp_path / "shared"))
    store = RunStore()
    assert store.db_path == tmp_path / "data" / store.db_path.name and store.db_path.exists()
    run = store.create_run(RunConfig())
    files = store.files(run.id)
    assert files.folder == tmp_path / "shared" / run.id and files.folder.is_dir()
    for folder in (store.layout.cache, store.layout.experiments, store.layout.datasets):
        assert folder.parent == tmp_path / "shared"
    # The record keeps the checkpoint relative; it resolves under the artifact root.
    store.set_best(run.id, 0.5, 1, 1, files.best)
    assert store.get_run(run.id).best_checkpoint == str(files.best)
    # A worker started from this store's environment sees the same places.
    env = store.environment()
    assert env[settings.ARTIFACTS_ENV] == str(tmp_path / "shared")
    assert env[settings.DATA_DIR_ENV] == str(tmp_path / "data")


def test_without_an_artifact_root_everything_stays_in_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(settings.DATA_DIR_ENV, str(tmp_path / "data"))
    layout = settings.StoreLayout.default()
    assert layout.artifacts == layout.root == tmp_path / "data"
    assert layout.run("r").folder == tmp_path / "data" / "r"
    assert settings.store_url() is None


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_engine_and_settings_do_not_import_upward():
    """Inside core, imports run analysis/views -> runs -> engine -> config/settings."""
    for path in sorted((ROOT / "core" / "engine").glob("*.py")):
        upward = {m for m in _imports(path)
                  if m.startswith(("core.runs", "core.analysis", "core.views"))}
        assert not upward, (path.name, upward)
    core_imports = {m for m in _imports(ROOT / "core" / "settings.py") if m.startswith("core")}
    assert core_imports <= {"core.atomic"}, core_imports


def test_a_sqlite_url_in_the_setting_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(settings.DB_ENV, f"sqlite:///{tmp_path / 'elsewhere' / 'lab.db'}")
    store = RunStore(tmp_path / "data")
    assert store.is_sqlite and store.db_path == tmp_path / "elsewhere" / "lab.db"
    assert store.location == str(store.db_path) and store.db_path.exists()
    store.create_run(RunConfig())
    assert len(RunStore(tmp_path / "data").list_runs()) == 1

"""Every dashboard page renders against a run store on PostgreSQL (FINETUNE_LAB_DB), with a
finished run and a queued one in it, through the real entry script (AppTest).

Needs FINETUNE_LAB_TEST_PG (tests/conftest.py): skipped without it, failed in CI."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import config as cfgmod
from core.runs.store import RunResults, RunStore, SplitSizes
from tests.conftest import empty_store_tables, tiny_config

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "streamlit_app.py")
TIMEOUT_S = 120  # per script run; the first New-run render imports torch on a shared 2-core box


def registered_pages() -> list[str]:
    tree = ast.parse((ROOT / "streamlit_app.py").read_text(encoding="utf-8"))
    pages = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PAGES")
    return [path for path, _, _ in pages]


@pytest.fixture
def pg_app_store(pg_url, tmp_path, monkeypatch, tiny_folder) -> RunStore:
    """The pages' store is PostgreSQL through FINETUNE_LAB_DB (the plain postgresql:// URL a
    user writes); artifacts in a temporary data directory. Holds a finished run with
    metrics and results, and a queued one."""
    monkeypatch.setenv("FINETUNE_LAB_DB", pg_url)
    monkeypatch.setenv("FINETUNE_LAB_DATA", str(tmp_path / "runs"))
    monkeypatch.setenv("FINETUNE_LAB_DATA_ROOTS", str(tiny_folder.parent))
    store = RunStore()
    assert not store.is_sqlite and not store.db_path.exists()
    empty_store_tables(store)
    cfg = tiny_config(tiny_folder)
    done = store.create_run(cfg, name="finished on postgres", group="exp-pg")
    assert store.claim_run_now(done.id, os.getpid())
    rows = []
    for ge in range(1, cfg.total_epochs + 1):
        stage = 1 if ge <= cfg.stages[0].epochs else 2
        rows += [(stage, float(ge), 2 * ge, "train/step_loss", 1.4 / ge),
                 (stage, float(ge), 2 * ge, "lr", 0.01 / stage),
                 (stage, float(ge), 2 * ge, "train/loss", 1.45 / ge),
                 (stage, float(ge), 2 * ge, "train/acc", 0.3 * ge),
                 (stage, float(ge), 2 * ge, "val/loss", 1.5 / ge),
                 (stage, float(ge), 2 * ge, "val/acc", 0.3 * ge)]
    store.log_metrics(done.id, rows)
    store.set_best(done.id, 0.6, len(cfg.stages), cfg.stages[-1].epochs, "")
    store.set_results(done.id, RunResults(classes=["red", "green", "blue"],
                                          sizes=SplitSizes(train=27, val=9, test=12),
                                          per_class_acc=[1.0, 0.5, None],
                                          confusion=[[4, 0, 0], [2, 2, 0], [0, 0, 0]]),
                      test_acc=0.55)
    store.set_note(done.id, "seeded for the PostgreSQL page test")
    store.set_tags(done.id, ["postgres"])
    store.finish_run(done.id, "finished")
    store.create_run(cfgmod.preset_config("Two-stage"), name="queued on postgres")
    return store


def test_every_page_renders_against_a_postgresql_store(pg_app_store, no_workers):
    finished = pg_app_store.list_runs(statuses=("finished",))[0]
    pages = registered_pages()
    assert "app_pages/runs.py" in pages and len(pages) >= 8
    for page in pages:
        at = AppTest.from_file(APP, default_timeout=TIMEOUT_S)
        at.session_state["selected_run_id"] = finished.id
        at.run()
        if page != pages[0]:
            at.switch_page(page).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert not at.error, (page, [e.value for e in at.error])
        if page == "app_pages/runs.py":  # the run's record and metrics came from PostgreSQL
            labels = {m.label: m.value for m in at.metric}
            assert labels.get("Best validation accuracy") == "60.00 %", labels
            specs = [c.proto.spec for c in at.get("plotly_chart")]
            assert any("Loss: training and validation" in s for s in specs)
    # Nothing was written to a SQLite file beside the artifacts.
    assert not pg_app_store.db_path.exists()

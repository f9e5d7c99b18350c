"""The run store's numbered migrations: a database written by the schema of before the typed
run record opens, is migrated, loses no row, and comes out as typed entities."""

from __future__ import annotations

import json
import sqlite3

import pytest

from core import config as cfgmod
from core.runs.store import SCHEMA_VERSION, RunStore, SplitSizes, StageWeightChange

# The schema as the store created it before numbered migrations (user_version 0).
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    grp TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    pid INTEGER,
    pid_start TEXT,
    host TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL,
    heartbeat_at REAL,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress TEXT NOT NULL DEFAULT '{}',
    best_val_acc REAL,
    best_stage INTEGER,
    best_epoch INTEGER,
    best_checkpoint TEXT,
    test_acc REAL,
    results TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status, created_at);
CREATE TABLE IF NOT EXISTS metrics (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    stage INTEGER NOT NULL,
    epoch REAL NOT NULL,
    step INTEGER NOT NULL,
    key TEXT NOT NULL,
    value REAL NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_run ON metrics(run_id, id);
"""

CONFIG = cfgmod.to_dict(cfgmod.preset_config("Two-stage", epochs=2, data_source="folder",
                                             data_path="/data/colors", weights="random"))
FINISHED_RESULTS = {
    "classes": ["blue", "green", "red"], "data": "image folder /data/colors",
    "skipped_files": 1, "skipped_examples": ["red/broken.png"],
    "sizes": {"train": 27, "val": 9, "test": 12}, "device": "cpu",
    "last_step": 16,
    "weight_change": [{"stage": 1, "groups": {"conv1": 0.0, "layer4": 0.12, "fc": 0.9}},
                      {"stage": 2, "groups": {"conv1": 0.0, "layer3": 0.05, "fc": 0.2}}],
    "test_loss": 0.7, "per_class_acc": [1.0, 0.5, None],
    "confusion": [[4, 0, 0], [2, 2, 0], [0, 0, 4]], "seconds": 12.5,
    "weights": "random initialisation",
}
PROGRESS = {"phase": "training", "stage": 2, "stages": 2, "epoch": 1, "epochs": 2, "step": 3,
            "steps_per_epoch": 4, "global_epoch": 3, "total_epochs": 4, "fraction": 0.6,
            "eta_s": 30.0, "updated_at": 1700000000.0}


def write_old_store(root, old_schema: str = OLD_SCHEMA) -> dict[str, int]:
    """A data directory as the old store left it: a finished run, a failed one that can be
    resumed, a queued one, with metric rows. Returns metric rows per run."""
    root.mkdir(parents=True)
    con = sqlite3.connect(root / "runs.sqlite3")
    con.executescript(old_schema)
    rows = [
        ("20260101-000000-aaaaaa", "finished one", "g", "finished", json.dumps(CONFIG), 1.0,
         json.dumps({}), 0.75, 2, 1, str(root / "20260101-000000-aaaaaa" / "best.pt"), 0.7,
         json.dumps(FINISHED_RESULTS)),
        ("20260101-000001-bbbbbb", "failed one", "", "failed", json.dumps(CONFIG), 2.0,
         json.dumps(PROGRESS), 0.5, 1, 2, "/old/place/20260101-000001-bbbbbb/best.pt", None,
         json.dumps({"classes": ["blue", "green", "red"], "last_step": 8})),
        ("20260101-000002-cccccc", "queued one", "", "queued", json.dumps(CONFIG), 3.0,
         "{}", None, None, None, None, None, "{}"),
    ]
    con.executemany(
        "INSERT INTO runs (id, name, grp, status, config, created_at, progress, best_val_acc, "
        "best_stage, best_epoch, best_checkpoint, test_acc, results) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    con.execute("UPDATE runs SET pid=4242 WHERE status='failed'")
    if "pid_start" in old_schema:
        con.execute("UPDATE runs SET pid_start='123456' WHERE status='failed'")
    counts = {"20260101-000000-aaaaaa": 16, "20260101-000001-bbbbbb": 12}
    for run_id, n in counts.items():
        con.executemany(
            "INSERT INTO metrics (run_id, stage, epoch, step, key, value, time) VALUES (?,?,?,?,?,?,?)",
            [(run_id, 1 + (s > 8), s / 4, s, "train/step_loss", 1.0 / s, 1.0) for s in range(1, n + 1)])
    con.commit()
    con.close()
    return counts


def test_a_database_of_the_old_schema_is_migrated_with_no_row_lost(tmp_path):
    root = tmp_path / "runs"
    counts = write_old_store(root)
    store = RunStore(root)

    with sqlite3.connect(store.db_path) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 3
        assert con.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == sum(counts.values())
        # The resume point left the results JSON for its own column.
        assert all("last_step" not in json.loads(r) for (r,) in con.execute("SELECT results FROM runs"))

    runs = {r.name: r for r in store.list_runs()}
    assert len(runs) == 3
    done = runs["finished one"]
    assert done.config == cfgmod.from_dict(CONFIG) and done.config_error is None
    assert done.group == "g" and done.status == "finished" and done.test_acc == 0.7
    assert done.last_step == 16
    r = done.results
    assert r.classes == ["blue", "green", "red"] and r.sizes == SplitSizes(27, 9, 12)
    assert r.skipped_files == 1 and r.skipped_examples == ["red/broken.png"]
    assert r.confusion == [[4, 0, 0], [2, 2, 0], [0, 0, 4]] and r.per_class_acc == [1.0, 0.5, None]
    assert r.weight_change == [
        StageWeightChange(1, {"conv1": 0.0, "layer4": 0.12, "fc": 0.9}),
        StageWeightChange(2, {"conv1": 0.0, "layer3": 0.05, "fc": 0.2})]
    assert (r.device, r.weights, r.seconds, r.test_loss) == ("cpu", "random initialisation", 12.5, 0.7)
    # The best checkpoint is found in the run's folder of this data directory, even where
    # the old record named another place.
    assert done.best_checkpoint == str(store.files(done.id).best)
    failed = runs["failed one"]
    assert failed.best_checkpoint == str(store.files(failed.id).best)
    assert failed.last_step == 8
    assert failed.pid == 4242 and failed.pid_start is None  # old /proc ticks can't be compared
    p = failed.progress
    assert (p.phase, p.stage, p.epoch, p.step, p.steps_per_epoch, p.fraction, p.eta_s) == (
        "training", 2, 1, 3, 4, 0.6, 30.0)
    queued = runs["queued one"]
    assert queued.last_step == -1 and queued.best_checkpoint is None
    assert queued.results.sizes is None and queued.progress.phase == ""

    # The migrated resume point is the one requeue uses.
    assert store.requeue(failed.id)
    assert max(m.step for m in store.metrics(failed.id)) == 8
    assert len(store.metrics(done.id)) == counts[done.id]

    # Opening again changes nothing (every step ran once).
    again = RunStore(root)
    assert [r.id for r in again.list_runs()] == [r.id for r in store.list_runs()]
    assert again.get_run(done.id) == store.get_run(done.id)


def test_the_oldest_schema_without_pid_start_is_migrated_too(tmp_path):
    root = tmp_path / "runs"
    write_old_store(root, OLD_SCHEMA.replace("    pid_start TEXT,\n", ""))
    store = RunStore(root)
    assert len(store.list_runs()) == 3
    run = store.create_run(cfgmod.preset_config("Two-stage"))
    assert store.claim_run_now(run.id, 1)
    assert store.get_run(run.id).status == "running"


def test_a_new_store_starts_at_the_latest_version(store):
    with sqlite3.connect(store.db_path) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_stored_config_that_no_longer_validates_still_loads_for_display(tmp_path):
    root = tmp_path / "runs"
    write_old_store(root)
    bad_value = {**CONFIG, "batch_size": 1}  # fails validation today
    unknown_key = {**CONFIG, "mixup": 0.2}  # a field that no longer exists
    with sqlite3.connect(root / "runs.sqlite3") as con:
        con.execute("UPDATE runs SET config=? WHERE name='finished one'", (json.dumps(bad_value),))
        con.execute("UPDATE runs SET config=? WHERE name='queued one'", (json.dumps(unknown_key),))
    runs = {r.name: r for r in RunStore(root).list_runs()}
    assert runs["finished one"].config.batch_size == 1 and runs["finished one"].config_error is None
    assert runs["queued one"].config_error and "mixup" in runs["queued one"].config_error


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]"])
def test_unreadable_json_columns_load_as_empty_entities(tmp_path, bad):
    root = tmp_path / "runs"
    write_old_store(root)
    with sqlite3.connect(root / "runs.sqlite3") as con:
        con.execute("UPDATE runs SET results=?, progress=? WHERE name='queued one'", (bad, bad))
    run = {r.name: r for r in RunStore(root).list_runs()}["queued one"]
    assert run.results.classes == [] and run.progress.fraction == 0.0


OPENER = """
import sys
from core.runs.store import RunStore
print(RunStore(sys.argv[1], url=sys.argv[2]).schema_version())
"""


def test_a_new_postgresql_database_is_migrated_once_by_racing_processes(tmp_path):
    """Several machines' first start on an empty PostgreSQL database: the numbered steps run
    once (the advisory lock), every opener ends at the latest version. (PostgreSQL stores
    start at this schema: there is no older PostgreSQL schema to migrate from.)"""
    import subprocess
    import sys

    import sqlalchemy as sa

    from tests.conftest import postgres_database

    with postgres_database() as url:
        procs = [subprocess.Popen([sys.executable, "-c", OPENER, str(tmp_path / "runs"), url],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(4)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [e.decode()[-800:] for _, e in outs]
        assert [int(o) for o, _ in outs] == [SCHEMA_VERSION] * 4
        store = RunStore(tmp_path / "runs", url=url)
        with store.engine.connect() as con:
            assert con.execute(sa.text("SELECT version FROM schema_version")).scalars().all() == [
                SCHEMA_VERSION]
        run = store.create_run(cfgmod.preset_config("Two-stage"))
        assert store.claim_run_now(run.id, 1) and store.get_run(run.id).status == "running"


def test_range_tests_recorded_before_run_kinds_become_lr_finder_runs(tmp_path):
    root = tmp_path / "runs"
    write_old_store(root)
    with sqlite3.connect(root / "runs.sqlite3") as con:
        con.execute("INSERT INTO runs (id, name, status, config, created_at) VALUES "
                    "('20260101-000003-dddddd', 'LR finder · stage 1 (layer4..fc) · 01-01 10:00', "
                    "'finished', ?, 4.0)", (json.dumps(CONFIG),))
    runs = RunStore(root).list_runs()
    assert {r.started_by for r in runs} == {""}  # nobody known started the runs of before
    kinds = {r.name: r.kind for r in runs}
    assert kinds.pop("LR finder · stage 1 (layer4..fc) · 01-01 10:00") == "lr_finder"
    assert set(kinds.values()) == {"training"}

"""The run store: entities, incremental reads, concurrency, and failure modes, on SQLite and
on PostgreSQL (the PostgreSQL cases need FINETUNE_LAB_TEST_PG; see tests/conftest.py)."""

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import sqlalchemy as sa

from core.config import RunConfig
from core.runs import store as store_module
from core.runs.store import SCHEMA_VERSION, RunStore, StoreError, database_url
from tests.conftest import wait_for

WRITERS, READERS = 4, 8
BATCHES, ROWS_PER_BATCH = 150, 5  # per writer: 750 rows, one transaction per batch


@pytest.fixture
def store(any_store) -> RunStore:
    """Every test here that takes `store` runs on SQLite and on PostgreSQL."""
    return any_store


def test_runs_are_plain_entities(store):
    config = RunConfig(seed=1)
    run = store.create_run(config, name="first", group="g")
    assert run.status == "queued" and run.config == config and run.group == "g"
    assert store.get_run("nope") is None
    assert [r.id for r in store.list_runs(statuses=("queued",))] == [run.id]
    assert store.list_runs(group="other") == []
    claimed = store.claim_next_queued(max_running=1)
    assert claimed.id == run.id and claimed.status == "running"
    assert store.claim_next_queued(max_running=1) is None  # limit reached
    store.finish_run(run.id, "finished")
    assert store.get_run(run.id).ended_at is not None


def test_runs_have_a_kind_and_lists_filter_by_it(store):
    from core.runs.entities import TRAINING_KINDS
    trained = store.create_run(RunConfig(), name="trained")
    finder = store.create_run(RunConfig(), name="range test", kind="lr_finder")
    assert trained.kind == "training" and store.get_run(finder.id).kind == "lr_finder"
    assert [r.id for r in store.list_runs(kinds=TRAINING_KINDS)] == [trained.id]
    assert {r.id for r in store.list_runs()} == {trained.id, finder.id}
    with pytest.raises(ValueError, match="unknown run kind"):
        store.create_run(RunConfig(), kind="nonsense")


def test_incremental_metric_reads(store):
    run = store.create_run(RunConfig())
    store.log_metrics(run.id, [(1, 0.5, 1, "train/step_loss", 2.0), (1, 1.0, 2, "val/acc", 0.5)])
    first = store.metrics(run.id)
    assert [m.key for m in first] == ["train/step_loss", "val/acc"]
    store.log_metrics(run.id, [(2, 1.5, 3, "train/step_loss", 1.0)])
    new = store.metrics(run.id, after_id=first[-1].id)
    assert [(m.stage, m.value) for m in new] == [(2, 1.0)]
    assert [m.key for m in store.metrics(run.id, keys=["val/acc"])] == ["val/acc"]


WRITER = """
import sys
from core.runs.store import RunProgress, RunStore
store = RunStore(sys.argv[1], url=sys.argv[3])
for b in range({batches}):
    store.log_metrics(sys.argv[2], [(1, b, b * {rows} + i, "train/step_loss", float(i)) for i in range({rows})])
    store.heartbeat(sys.argv[2], RunProgress(step=b))
"""


def test_four_writers_and_eight_readers_lose_nothing(store):
    runs = [store.create_run(RunConfig(), name=f"w{i}") for i in range(WRITERS)]
    script = WRITER.format(batches=BATCHES, rows=ROWS_PER_BATCH)
    errors: list[BaseException] = []
    reads = [0] * READERS
    stop = threading.Event()

    def reader(k):
        last = {r.id: 0 for r in runs}
        try:
            while not stop.is_set():
                for r in runs:
                    rows = store.metrics(r.id, after_id=last[r.id])
                    if rows:
                        last[r.id] = rows[-1].id
                    store.list_runs()
                    reads[k] += 1
        except BaseException as exc:  # noqa: BLE001 - any error fails the test
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(READERS)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", script, str(store.root), r.id, store.url],
                              stderr=subprocess.PIPE) for r in runs]
    outs = [p.communicate(timeout=240) for p in procs]
    elapsed = time.monotonic() - t0
    stop.set()
    for t in threads:
        t.join()
    assert all(p.returncode == 0 for p in procs), [o[1].decode()[-500:] for o in outs]
    assert not errors, errors
    for r in runs:
        rows = store.metrics(r.id)
        assert len(rows) == BATCHES * ROWS_PER_BATCH
        assert len({m.step for m in rows}) == len(rows), "duplicated rows"
    assert min(reads) > 0
    print(f"\n{store.engine.dialect.name}: {WRITERS} writers x {BATCHES * ROWS_PER_BATCH} rows with {READERS} readers: "
          f"{elapsed:.1f} s, {sum(reads)} reader polls")


def test_unusable_data_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="Cannot use the run store"):
        RunStore(blocker / "runs")


def test_full_disk_is_a_clear_error_and_the_store_survives(tmp_path):
    store = RunStore(tmp_path / "runs")  # SQLite's own disk-full; a server's is its admin's
    run = store.create_run(RunConfig())
    store.log_metrics(run.id, [(1, 1.0, 1, "val/acc", 0.5)])

    def tiny_disk(dbapi_con, _record):
        # SQLite's own "disk full": the file may not grow past its current pages.
        (pages,) = dbapi_con.execute("PRAGMA page_count").fetchone()
        dbapi_con.execute(f"PRAGMA max_page_count={pages}")

    sa.event.listen(store.engine, "connect", tiny_disk)  # every call opens a connection
    try:
        with pytest.raises(StoreError, match="disk is full|full"):
            store.log_metrics(run.id, [(1, 1.0, i, "x", 1.0) for i in range(20000)])
    finally:
        sa.event.remove(store.engine, "connect", tiny_disk)
    # Nothing half-written; the store still works.
    assert [m.value for m in store.metrics(run.id)] == [0.5]
    with sqlite3.connect(store.db_path) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store.log_metrics(run.id, [(1, 2.0, 2, "val/acc", 0.6)])
    assert len(store.metrics(run.id)) == 2
    assert store.get_run(run.id).config == RunConfig()


def test_where_a_run_executes_is_recorded(store):
    run = store.create_run(RunConfig())
    assert (run.executor, run.job_id) == (None, None)
    store.set_job(run.id, "ray", "raysubmit-1", host="node-7")
    got = store.get_run(run.id)
    assert (got.executor, got.job_id, got.host) == ("ray", "raysubmit-1", "node-7")
    store.set_job(run.id, "local", None)  # no host given: the recorded one stays
    got = store.get_run(run.id)
    assert (got.executor, got.job_id, got.host) == ("local", None, "node-7")


def test_notes_and_tags(store):
    a = store.create_run(RunConfig(), name="a")
    b = store.create_run(RunConfig(), name="b")
    assert (a.note, a.tags) == ("", ())
    store.set_note(a.id, "lr too high?")
    assert store.set_tags(a.id, [" baseline", "lr", "lr", ""]) == ("baseline", "lr")
    store.set_tags(b.id, ["lr"])
    got = store.get_run(a.id)
    assert (got.note, got.tags) == ("lr too high?", ("baseline", "lr"))
    assert [r.name for r in store.list_runs(tag="lr")] == ["b", "a"]
    assert [r.name for r in store.list_runs(tag="baseline")] == ["a"]
    assert store.list_runs(tag="nope") == []
    assert store.all_tags() == ["baseline", "lr"]
    store.set_tags(a.id, [])
    assert store.get_run(a.id).tags == () and store.all_tags() == ["lr"]
    store.delete_run(b.id)
    assert store.all_tags() == []


def test_a_resumed_run_s_new_rows_come_after_every_cursor(store):
    """requeue drops rows past the resume point; the rows logged again get new numbers, so
    a reader that had read past the dropped rows still gets them."""
    run = store.create_run(RunConfig())
    store.log_metrics(run.id, [(1, 1.0, s, "train/step_loss", 1.0 / s) for s in range(1, 7)])
    store.set_last_step(run.id, 3)
    cursor = store.metrics(run.id)[-1].id
    assert store.claim_next_queued(max_running=1).id == run.id
    store.finish_run(run.id, "failed", "killed")
    assert store.requeue(run.id)
    assert [m.step for m in store.metrics(run.id)] == [1, 2, 3]
    store.log_metrics(run.id, [(1, 1.0, s, "train/step_loss", 0.5 / s) for s in range(4, 7)])
    assert [m.step for m in store.metrics(run.id, after_id=cursor)] == [4, 5, 6]


CLAIMER = """
import json, sys
from core.runs.store import RunStore
store = RunStore(sys.argv[1], url=sys.argv[2])
claimed = []
while (run := store.claim_next_queued(max_running=int(sys.argv[3]))) is not None:
    claimed.append(run.id)
print(json.dumps(claimed))
"""


def test_claiming_is_atomic_across_processes(store):
    """Four processes (dashboards or command lines on other machines) claim from one queue:
    no run is claimed twice, and together they respect the running limit."""
    queued = [store.create_run(RunConfig(), name=f"q{i}").id for i in range(12)]
    limit = 7
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(store.root), store.url,
                               str(limit)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e.decode()[-500:] for _, e in outs]
    claimed = [run_id for out, _ in outs for run_id in json.loads(out)]
    assert len(claimed) == len(set(claimed)) == limit
    running = {r.id for r in store.list_runs(statuses=("running",))}
    assert running == set(claimed) and running <= set(queued)
    # The oldest runs go first.
    assert running == set(queued[:limit])


def test_incremental_reads_follow_commit_order_not_insert_order(pg_store):
    """PostgreSQL gives a row its id at INSERT, not at COMMIT. Writer 1 inserts rows and
    commits late; writer 2 of the same run (a worker declared dead but still running, and
    its resumed successor) writes meanwhile. A reader that took the largest id it saw as
    its cursor would skip writer 1's rows for good. The store's per-run seq, allocated under
    the run row's lock, makes writer 2 wait and number its rows after writer 1's."""
    store = pg_store
    run = store.create_run(RunConfig())
    first = [(1, 0.5, s, "train/step_loss", 1.0) for s in range(1, 4)]
    second = [(1, 1.0, s, "train/step_loss", 2.0) for s in range(4, 7)]
    seen = []

    def read_new():
        seen.extend(store.metrics(run.id, after_id=seen[-1].id if seen else 0))

    errors: list[BaseException] = []

    def writer_2():
        try:
            store.log_metrics(run.id, second)
        except BaseException as exc:  # noqa: BLE001 - fails the test below
            errors.append(exc)

    with store._write() as con:  # writer 1: inserted, not committed
        store._append_metrics(con, run.id, first)
        thread = threading.Thread(target=writer_2)
        thread.start()
        # Writer 2 either waits for writer 1's lock or (with a global id cursor and no lock)
        # would commit now; then the reader looks.
        wait_for(lambda: not thread.is_alive() or _waiting_on_a_lock(store), 30,
                 "writer 2 to commit or to wait for writer 1")
        read_new()
    thread.join(timeout=30)
    assert not thread.is_alive() and not errors, errors
    read_new()
    assert [m.step for m in seen] == [1, 2, 3, 4, 5, 6], "a row was skipped or reordered"
    assert [m.id for m in seen] == sorted(m.id for m in seen)


def _waiting_on_a_lock(store) -> bool:
    with store.engine.connect() as con:
        return bool(con.exec_driver_sql(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'").scalar())


def test_the_schema_is_the_tables_the_queries_use(store):
    """Migrations (SQLite's words, translated for PostgreSQL) build exactly the tables the
    queries are written against, and the version is the latest."""
    assert store.schema_version() == SCHEMA_VERSION
    inspector = sa.inspect(store.engine)
    for table in store_module.metadata.sorted_tables:
        assert {c["name"] for c in inspector.get_columns(table.name)} == set(table.c.keys())
    # Times are doubles on both (PostgreSQL's REAL would round a time to minutes).
    run = store.create_run(RunConfig())
    assert abs(store.get_run(run.id).created_at - time.time()) < 60


def test_another_process_opens_the_same_store_from_the_environment(store):
    """What a worker or a Ray job gets: the store's environment names the database and the
    artifact root; RunStore() with no arguments there is the same store."""
    run = store.create_run(RunConfig(), name="from env")
    env = {k: v for k, v in os.environ.items()
           if k not in ("FINETUNE_LAB_DATA", "FINETUNE_LAB_DB", "FINETUNE_LAB_ARTIFACTS")}
    script = ("import sys; from core.runs.store import RunStore; s = RunStore(); "
              "r = s.get_run(sys.argv[1]); print(r.name, s.run_dir(r.id))")
    out = subprocess.run([sys.executable, "-c", script, run.id], env={**env, **store.environment()},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-800:]
    assert out.stdout.split() == ["from", "env", str(store.run_dir(run.id))]


def test_postgresql_urls_are_mapped_to_the_psycopg_driver():
    for plain in ("postgresql://u:pw@db.example/lab", "postgres://u:pw@db.example/lab"):
        url = database_url(plain)
        assert url.drivername == "postgresql+psycopg" and url.database == "lab"
    assert database_url("postgresql+psycopg://u@h/x").drivername == "postgresql+psycopg"
    with pytest.raises(StoreError, match="SQLite or PostgreSQL"):
        database_url("mysql://u@h/x")


def test_an_unreachable_postgresql_is_a_clear_error_without_the_password(tmp_path):
    # Port 1 on loopback: refused at once, nothing leaves the machine.
    with pytest.raises(StoreError, match="Cannot use the run store at postgresql") as info:
        RunStore(tmp_path / "runs", url="postgresql://lab:s3cret@127.0.0.1:1/lab")
    assert "s3cret" not in str(info.value) and "FINETUNE_LAB_DB" in str(info.value)


def test_a_store_whose_file_became_unreadable_is_a_clear_error(tmp_path):
    store = RunStore(tmp_path / "runs")
    store.db_path.write_bytes(b"not a database" * 100)  # replaced behind its back
    with pytest.raises(StoreError, match="Could not read the run store"):
        store.list_runs()


def test_rows_logged_for_a_deleted_run_are_dropped(store):
    run = store.create_run(RunConfig())
    store.log_metrics(run.id, [(1, 1.0, 1, "val/acc", 0.5)])
    store.delete_run(run.id)
    store.log_metrics(run.id, [(1, 2.0, 2, "val/acc", 0.6)])  # its worker had not noticed yet
    assert store.metrics(run.id) == [] and store.get_run(run.id) is None


def test_a_tool_job_s_request_is_in_its_folder_before_its_row_exists(store):
    """A worker may claim a queued run the moment its row commits: an LR finder's or an
    export's request must already be there (it was written after the row, a race)."""
    seen_before_insert = []
    real_write = store._write

    def checking_write():
        folders = list(store.layout.artifacts.iterdir()) if store.layout.artifacts.exists() else []
        seen_before_insert.append([p.name for f in folders if f.is_dir() for p in f.iterdir()])
        return real_write()

    store._write = checking_write
    run = store.create_run(RunConfig(), kind="export", job_request={"source_run": "x"})
    store._write = real_write
    assert store.files(run.id).job_request.name in seen_before_insert[0]
    assert json.loads(store.files(run.id).job_request.read_text()) == {"source_run": "x"}


def test_who_started_a_run_is_recorded(store):
    """Issue 21: the signed-in e-mail when the dashboard passes one, else the account that
    submitted it."""
    from core.process import local_user
    from core.runs import jobs

    signed_in = store.create_run(RunConfig(), started_by="ada@lab.io")
    assert store.get_run(signed_in.id).started_by == "ada@lab.io"
    assert store.create_run(RunConfig()).started_by == local_user() != ""
    # The dashboard's submit passes the signed-in e-mail through (data checks are not the point).
    run = jobs.submit(store, RunConfig(), name="queued", start=False, check_data=False,
                      started_by="bob@lab.io")
    assert store.get_run(run.id).started_by == "bob@lab.io"

"""The run store: entities, incremental reads, concurrency, and failure modes."""

import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from core.config import RunConfig
from core.runs.store import RunStore, StoreError

WRITERS, READERS = 4, 8
BATCHES, ROWS_PER_BATCH = 150, 5  # per writer: 750 rows, one transaction per batch


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
store = RunStore(sys.argv[1])
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
    procs = [subprocess.Popen([sys.executable, "-c", script, str(store.root), r.id],
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
    print(f"\n{WRITERS} writers x {BATCHES * ROWS_PER_BATCH} rows with {READERS} readers: "
          f"{elapsed:.1f} s, {sum(reads)} reader polls")


def test_unusable_data_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="Cannot use the run store"):
        RunStore(blocker / "runs")


def test_full_disk_is_a_clear_error_and_the_store_survives(store, monkeypatch):
    run = store.create_run(RunConfig())
    store.log_metrics(run.id, [(1, 1.0, 1, "val/acc", 0.5)])
    original = RunStore._connect

    import contextlib

    @contextlib.contextmanager
    def tiny_disk(self):
        with original(self) as con:
            # SQLite's own "disk full": the file may not grow past its current pages.
            (pages,) = con.execute("PRAGMA page_count").fetchone()
            con.execute(f"PRAGMA max_page_count={pages}")
            yield con

    monkeypatch.setattr(RunStore, "_connect", tiny_disk)
    with pytest.raises(StoreError, match="disk is full|full"):
        store.log_metrics(run.id, [(1, 1.0, i, "x", 1.0) for i in range(20000)])
    monkeypatch.setattr(RunStore, "_connect", original)
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

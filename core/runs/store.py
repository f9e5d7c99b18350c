"""The run store: SQLite in WAL mode under a data directory, reached only through this module.

Pages and the CLI create runs and request cancellation; the worker writes a run's progress.
Every call opens a short-lived connection, so any number of processes can share the file;
writes take the write lock up front (BEGIN IMMEDIATE) and wait on a busy timeout, which is
what keeps several writers and many readers from ever seeing "database is locked".
Everything returned is a plain entity (dataclass), never a DB row.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

DATA_DIR_ENV = "FINETUNE_LAB_DATA"
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "runs"
BUSY_TIMEOUT_S = 30.0  # how long a writer waits for the lock before giving up

STATUSES = ("queued", "running", "finished", "failed", "cancelled")
ACTIVE = ("queued", "running")
DONE = ("finished", "failed", "cancelled")

SCHEMA = """
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


class StoreError(RuntimeError):
    """The store cannot be used (unwritable directory, full disk, corrupt file)."""


@dataclass(frozen=True)
class Run:
    id: str
    name: str
    group: str
    status: str
    config: dict[str, Any]
    created_at: float
    pid: int | None = None
    # The process's start time (kernel ticks since boot, from /proc): with the pid it names
    # one process, so a reused pid is never mistaken for the worker.
    pid_start: str | None = None
    host: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    heartbeat_at: float | None = None
    error: str | None = None
    cancel_requested: bool = False
    # Worker-reported position: stage, epoch (1-based), step, steps_per_epoch, total_epochs,
    # epochs_done, fraction (0..1 of the whole run), eta_s.
    progress: dict[str, Any] = field(default_factory=dict)
    best_val_acc: float | None = None
    best_stage: int | None = None
    best_epoch: int | None = None
    best_checkpoint: str | None = None
    test_acc: float | None = None
    # Final evaluation: per_class_acc, confusion, classes, ... (see core.runs.worker)
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.ended_at or time.time()) - self.started_at


@dataclass(frozen=True)
class MetricRow:
    id: int
    run_id: str
    stage: int
    epoch: float  # fractional inside an epoch for step-level rows (e.g. 1.25)
    step: int  # global optimizer step within the run
    key: str  # "train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch_s", ...
    value: float
    time: float


def proc_stat(pid: int) -> list[bytes] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), or None when there
    is no such process or no procfs."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> str | None:
    """A process's start time in kernel ticks since boot (/proc/<pid>/stat field 22), or
    None where there is no procfs."""
    fields = proc_stat(pid)
    return fields[19].decode() if fields and len(fields) > 19 else None


def data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


class RunStore:
    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = Path(root) if root is not None else data_dir()
        self.db_path = self.root / "runs.sqlite3"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with self._connect() as con:
                con.execute("PRAGMA journal_mode=WAL")
                con.executescript(SCHEMA)
                self._migrate(con)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(
                f"Cannot use the run store at {self.root}: {exc}. Check that the folder is "
                f"writable and the disk has space, or point {DATA_DIR_ENV} at another folder."
            ) from exc

    # ---------------------------------------------------------------- plumbing

    @staticmethod
    def _migrate(con: sqlite3.Connection) -> None:
        """Columns added after a store was created."""
        have = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
        if "pid_start" not in have:
            con.execute("ALTER TABLE runs ADD COLUMN pid_start TEXT")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            con.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            con.execute("PRAGMA synchronous=NORMAL")  # safe in WAL mode; much faster commits
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock at BEGIN: a deferred transaction that
        upgrades from read to write can fail with SQLITE_BUSY without waiting."""
        with self._connect() as con:
            try:
                con.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreError(f"run store is busy or unwritable: {exc}") from exc
            try:
                yield con
                con.execute("COMMIT")
            except BaseException as exc:
                if con.in_transaction:  # SQLite already rolled back on e.g. SQLITE_FULL
                    con.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError):
                    raise StoreError(
                        f"Could not write to the run store ({exc}). If the disk is full, free "
                        f"space; if the folder is read-only, set {DATA_DIR_ENV}."
                    ) from exc
                raise

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._connect() as con:
            con.row_factory = sqlite3.Row
            return con.execute(sql, params).fetchall()

    @staticmethod
    def _run(row: sqlite3.Row) -> Run:
        return Run(
            id=row["id"], name=row["name"], group=row["grp"], status=row["status"],
            config=json.loads(row["config"]), created_at=row["created_at"], pid=row["pid"],
            pid_start=row["pid_start"],
            host=row["host"], started_at=row["started_at"], ended_at=row["ended_at"],
            heartbeat_at=row["heartbeat_at"], error=row["error"],
            cancel_requested=bool(row["cancel_requested"]), progress=json.loads(row["progress"]),
            best_val_acc=row["best_val_acc"], best_stage=row["best_stage"],
            best_epoch=row["best_epoch"], best_checkpoint=row["best_checkpoint"],
            test_acc=row["test_acc"], results=json.loads(row["results"]),
        )

    def run_dir(self, run_id: str) -> Path:
        return self.root / run_id

    # ---------------------------------------------------------------- runs

    def create_run(self, config: dict[str, Any], name: str = "", group: str = "") -> Run:
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        now = time.time()
        with self._write() as con:
            con.execute(
                "INSERT INTO runs (id, name, grp, status, config, created_at) VALUES (?,?,?,?,?,?)",
                (run_id, name or run_id, group, "queued", json.dumps(config), now),
            )
        self.run_dir(run_id).mkdir(parents=True, exist_ok=True)
        return self.get_run(run_id)  # type: ignore[return-value]

    def get_run(self, run_id: str) -> Run | None:
        rows = self._read("SELECT * FROM runs WHERE id=?", (run_id,))
        return self._run(rows[0]) if rows else None

    def list_runs(self, statuses: Sequence[str] = (), group: str | None = None) -> list[Run]:
        """Runs, newest first, optionally filtered by status and group."""
        sql, params = "SELECT * FROM runs", []
        where = []
        if statuses:
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            params += list(statuses)
        if group is not None:
            where.append("grp=?")
            params.append(group)
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [self._run(r) for r in self._read(sql + " ORDER BY created_at DESC", params)]

    def claim_next_queued(self, max_running: int) -> Run | None:
        """Atomically move the oldest queued run to running if fewer than `max_running`
        runs are running. Returns the claimed run, or None."""
        with self._write() as con:
            (running,) = con.execute("SELECT COUNT(*) FROM runs WHERE status='running'").fetchone()
            if running >= max_running:
                return None
            row = con.execute(
                "SELECT id FROM runs WHERE status='queued' ORDER BY created_at, id LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            now = time.time()
            con.execute(
                "UPDATE runs SET status='running', started_at=?, heartbeat_at=?, host=? WHERE id=?",
                (now, now, socket.gethostname(), row[0]),
            )
        return self.get_run(row[0])

    def claim_run_now(self, run_id: str, pid: int) -> bool:
        """Claim a specific queued run for the calling process (foreground CLI runs skip
        the queue). Returns whether it was claimed."""
        now = time.time()
        with self._write() as con:
            cur = con.execute(
                "UPDATE runs SET status='running', started_at=?, heartbeat_at=?, host=?, pid=?, "
                "pid_start=? WHERE id=? AND status='queued'",
                (now, now, socket.gethostname(), pid, process_start(pid), run_id))
            return cur.rowcount > 0

    def set_pid(self, run_id: str, pid: int) -> None:
        with self._write() as con:
            con.execute("UPDATE runs SET pid=?, pid_start=?, host=? WHERE id=?",
                        (pid, process_start(pid), socket.gethostname(), run_id))

    def heartbeat(self, run_id: str, progress: dict[str, Any] | None = None) -> bool:
        """Record liveness (and progress). Returns whether the worker should stop:
        cancellation requested, or the run is no longer 'running'."""
        with self._write() as con:
            if progress is None:
                con.execute("UPDATE runs SET heartbeat_at=? WHERE id=?", (time.time(), run_id))
            else:
                con.execute("UPDATE runs SET heartbeat_at=?, progress=? WHERE id=?",
                            (time.time(), json.dumps(progress), run_id))
            row = con.execute("SELECT cancel_requested, status FROM runs WHERE id=?",
                              (run_id,)).fetchone()
        # A run someone else settled (declared dead, deleted) must stop too.
        return row is None or bool(row[0]) or row[1] != "running"

    def cancel_requested(self, run_id: str) -> bool:
        rows = self._read("SELECT cancel_requested FROM runs WHERE id=?", (run_id,))
        return bool(rows and rows[0][0])

    def request_cancel(self, run_id: str) -> Run | None:
        """Queued runs are cancelled at once; running ones are asked to stop."""
        with self._write() as con:
            con.execute(
                "UPDATE runs SET status='cancelled', ended_at=?, error='cancelled before it started' "
                "WHERE id=? AND status='queued'", (time.time(), run_id))
            con.execute("UPDATE runs SET cancel_requested=1 WHERE id=? AND status='running'", (run_id,))
        return self.get_run(run_id)

    def set_best(self, run_id: str, val_acc: float, stage: int, epoch: int, checkpoint: str) -> None:
        with self._write() as con:
            con.execute(
                "UPDATE runs SET best_val_acc=?, best_stage=?, best_epoch=?, best_checkpoint=? WHERE id=?",
                (val_acc, stage, epoch, checkpoint, run_id))

    def set_results(self, run_id: str, test_acc: float | None, results: dict[str, Any]) -> None:
        """Record the test accuracy and merge `results` into the run's results."""
        self.merge_results(run_id, results, test_acc=test_acc)

    def merge_results(self, run_id: str, extra: dict[str, Any], test_acc: float | None = None) -> None:
        """Add or replace keys of a run's results (and set test_acc when given),
        read-modify-write in one transaction."""
        with self._write() as con:
            row = con.execute("SELECT results FROM runs WHERE id=?", (run_id,)).fetchone()
            if row is None:
                return
            merged = {**json.loads(row[0]), **extra}
            con.execute("UPDATE runs SET results=?, test_acc=COALESCE(?, test_acc) WHERE id=?",
                        (json.dumps(merged), test_acc, run_id))

    def finish_run(self, run_id: str, status: str, error: str | None = None,
                   only_if_running: bool = False) -> bool:
        """Move a run to a final status. Returns False when `only_if_running` and it
        was no longer running (someone else already settled it)."""
        assert status in DONE, status
        with self._write() as con:
            sql = "UPDATE runs SET status=?, error=?, ended_at=? WHERE id=?"
            if only_if_running:
                sql += " AND status='running'"
            cur = con.execute(sql, (status, error, time.time(), run_id))
            return cur.rowcount > 0

    def requeue(self, run_id: str) -> bool:
        """Put a failed/cancelled run back in the queue (resume). Metric rows past the last
        resumable point (results["last_step"], the step of the last saved epoch) are
        dropped in the same transaction, so no reader ever sees the rows the resumed
        worker is about to write again. Returns whether the run was requeued."""
        with self._write() as con:
            row = con.execute("SELECT results FROM runs WHERE id=? AND status IN "
                              "('failed','cancelled')", (run_id,)).fetchone()
            if row is None:
                return False
            last_step = json.loads(row[0]).get("last_step", -1)
            con.execute("DELETE FROM metrics WHERE run_id=? AND step>?", (run_id, last_step))
            con.execute(
                "UPDATE runs SET status='queued', error=NULL, ended_at=NULL, pid=NULL, "
                "pid_start=NULL, cancel_requested=0 WHERE id=?", (run_id,))
            return True

    def delete_run(self, run_id: str) -> None:
        import shutil

        with self._write() as con:
            con.execute("DELETE FROM metrics WHERE run_id=?", (run_id,))
            con.execute("DELETE FROM runs WHERE id=?", (run_id,))
        shutil.rmtree(self.run_dir(run_id), ignore_errors=True)

    # ---------------------------------------------------------------- metrics

    def log_metrics(self, run_id: str, rows: Sequence[tuple[int, float, int, str, float]]) -> None:
        """Append rows of (stage, epoch, step, key, value) in one transaction."""
        if not rows:
            return
        now = time.time()
        with self._write() as con:
            con.executemany(
                "INSERT INTO metrics (run_id, stage, epoch, step, key, value, time) VALUES (?,?,?,?,?,?,?)",
                [(run_id, int(s), float(e), int(st), k, float(v), now) for s, e, st, k, v in rows],
            )

    def truncate_metrics(self, run_id: str, after_step: int) -> None:
        """Drop rows past `after_step` (a resumed run replays from its last checkpoint)."""
        with self._write() as con:
            con.execute("DELETE FROM metrics WHERE run_id=? AND step>?", (run_id, after_step))

    def metrics(self, run_id: str, after_id: int = 0, keys: Sequence[str] = ()) -> list[MetricRow]:
        """Metric rows of a run with id > after_id, in order: the streaming read."""
        sql = "SELECT * FROM metrics WHERE run_id=? AND id>?"
        params: list[Any] = [run_id, after_id]
        if keys:
            sql += f" AND key IN ({','.join('?' * len(keys))})"
            params += list(keys)
        return [MetricRow(**dict(r)) for r in self._read(sql + " ORDER BY id", params)]

"""The run store: SQLite in WAL mode under a data directory, reached only through this module.

Pages and the CLI create runs and request cancellation; the worker writes a run's progress.
Every call opens a short-lived connection, so any number of processes can share the file;
writes take the write lock up front (BEGIN IMMEDIATE) and wait on a busy timeout, which is
what keeps several writers and many readers from ever seeing "database is locked".

Everything returned is a typed entity (core.runs.entities), never a row or a dict: JSON is
only the storage format inside a few columns, converted here by one to/from pair per entity.
The schema changes only through MIGRATIONS, numbered by SQLite's `user_version`. All SQL of
the project is in this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from core import config as cfgmod
from core.config import RunConfig
from core.runs.entities import (
    ACTIVE,
    DONE,
    STATUSES,
    MetricRow,
    Run,
    RunProgress,
    RunResults,
    SplitSizes,
    StageWeightChange,
)
from core.runs.files import DATA_DIR_ENV, DEFAULT_DATA_DIR, RunFiles, StoreLayout, data_dir
from core.process import process_identity

__all__ = ["ACTIVE", "DATA_DIR_ENV", "DEFAULT_DATA_DIR", "DONE", "STATUSES", "MetricRow", "Run",
           "RunProgress", "RunResults", "RunStore", "SplitSizes", "StageWeightChange",
           "StoreError", "data_dir"]

log = logging.getLogger("finetune_lab.store")
BUSY_TIMEOUT_S = 30.0  # how long a writer waits for the lock before giving up


class StoreError(RuntimeError):
    """The store cannot be used (unwritable directory, full disk, corrupt file)."""


# ---------------------------------------------------------------- schema migrations
# Each step moves the schema from version i to i + 1 (PRAGMA user_version). Steps run in one
# write transaction with the version bump, so a crash or a second process never sees half a
# migration. A database written before versioning (user_version 0) may already have some of
# these changes, so the early steps check before they change.


def _columns(con: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in con.execute(f"PRAGMA table_info({table})")}


def _m1_initial(con: sqlite3.Connection) -> None:
    """The tables as first created."""
    con.execute("""
        CREATE TABLE IF NOT EXISTS runs (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            grp TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL,
            config TEXT NOT NULL,
            pid INTEGER,
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
        )""")
    con.execute("CREATE INDEX IF NOT EXISTS runs_status ON runs(status, created_at)")
    con.execute("""
        CREATE TABLE IF NOT EXISTS metrics (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL,
            stage INTEGER NOT NULL,
            epoch REAL NOT NULL,
            step INTEGER NOT NULL,
            key TEXT NOT NULL,
            value REAL NOT NULL,
            time REAL NOT NULL
        )""")
    con.execute("CREATE INDEX IF NOT EXISTS metrics_run ON metrics(run_id, id)")


def _m2_pid_start(con: sqlite3.Connection) -> None:
    """The worker process's start time, so a reused pid is not mistaken for the worker."""
    if "pid_start" not in _columns(con, "runs"):
        con.execute("ALTER TABLE runs ADD COLUMN pid_start TEXT")


def _m3_last_step_column(con: sqlite3.Connection) -> None:
    """The resume point moves out of the results JSON into its own column."""
    con.execute("ALTER TABLE runs ADD COLUMN last_step INTEGER NOT NULL DEFAULT -1")
    for run_id, results in con.execute("SELECT id, results FROM runs").fetchall():
        data = _json_object(results)
        if "last_step" in data:
            step = data.pop("last_step")
            con.execute("UPDATE runs SET last_step=?, results=? WHERE id=?",
                        (int(step) if isinstance(step, (int, float)) else -1, json.dumps(data),
                         run_id))


def _m4_relative_best_checkpoint(con: sqlite3.Connection) -> None:
    """best_checkpoint was an absolute path; it becomes relative to the run's folder (so the
    data directory can move). Process start times change from /proc ticks to psutil's
    creation time: old ones cannot be compared, so they are dropped (the pid still counts)."""
    rows = con.execute("SELECT id, best_checkpoint FROM runs WHERE best_checkpoint IS NOT NULL")
    for run_id, path in rows.fetchall():
        p = Path(path)
        if p.is_absolute() and p.parent.name == run_id:
            con.execute("UPDATE runs SET best_checkpoint=? WHERE id=?", (p.name, run_id))
    con.execute("UPDATE runs SET pid_start=NULL")


def _m5_executor_job(con: sqlite3.Connection) -> None:
    """Where a run ran: the executor ("local", "ray") and its job id there."""
    con.execute("ALTER TABLE runs ADD COLUMN executor TEXT")
    con.execute("ALTER TABLE runs ADD COLUMN job_id TEXT")


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _m1_initial, _m2_pid_start, _m3_last_step_column, _m4_relative_best_checkpoint,
    _m5_executor_job)
SCHEMA_VERSION = len(MIGRATIONS)


# ---------------------------------------------------------------- JSON columns <-> entities


def _json_object(text: str | None) -> dict[str, Any]:
    try:
        data = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The entries of `data` that are fields of `cls` (rows written by older versions may
    hold keys that are gone)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def config_to_json(config: RunConfig) -> str:
    return json.dumps(cfgmod.to_dict(config))


def config_from_json(text: str) -> tuple[RunConfig, str | None]:
    """The stored config, and why it no longer loads when it does not. Values are not
    validated: a run made under older rules still shows what it ran with."""
    try:
        return cfgmod.from_dict(_json_object(text), validate_values=False), None
    except cfgmod.ConfigError as exc:
        return RunConfig(), f"the stored config no longer loads: {exc}"


def progress_to_json(progress: RunProgress) -> str:
    return json.dumps(dataclasses.asdict(progress))


def progress_from_json(text: str) -> RunProgress:
    return RunProgress(**_known(RunProgress, _json_object(text)))


def results_to_json(results: RunResults) -> str:
    return json.dumps(dataclasses.asdict(results))


def results_from_json(text: str) -> RunResults:
    data = _known(RunResults, _json_object(text))
    sizes = data.pop("sizes", None)
    changes = data.pop("weight_change", None) or []
    return RunResults(
        **data,
        sizes=SplitSizes(**_known(SplitSizes, sizes)) if isinstance(sizes, dict) else None,
        weight_change=[StageWeightChange(stage=int(c["stage"]), groups=dict(c["groups"]))
                       for c in changes if isinstance(c, dict) and "stage" in c and "groups" in c],
    )


class RunStore:
    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.layout = StoreLayout(Path(root) if root is not None else data_dir())
        self.root = self.layout.root
        self.db_path = self.layout.database
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with self._connect() as con:
                con.execute("PRAGMA journal_mode=WAL")
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(
                f"Cannot use the run store at {self.root}: {exc}. Check that the folder is "
                f"writable and the disk has space, or point {DATA_DIR_ENV} at another folder."
            ) from exc

    # ---------------------------------------------------------------- plumbing

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION, one numbered step at a time."""
        with self._connect() as con:
            (version,) = con.execute("PRAGMA user_version").fetchone()
        if version >= SCHEMA_VERSION:
            return
        with self._write() as con:  # re-read under the lock: another process may have won
            (version,) = con.execute("PRAGMA user_version").fetchone()
            for number in range(version, SCHEMA_VERSION):
                MIGRATIONS[number](con)
                con.execute(f"PRAGMA user_version={number + 1}")
                log.info("run store %s: schema version %d", self.db_path, number + 1)

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

    def _run(self, row: sqlite3.Row) -> Run:
        config, config_error = config_from_json(row["config"])
        best = row["best_checkpoint"]
        return Run(
            id=row["id"], name=row["name"], group=row["grp"], status=row["status"],
            config=config, config_error=config_error, created_at=row["created_at"], pid=row["pid"],
            pid_start=row["pid_start"],
            host=row["host"], started_at=row["started_at"], ended_at=row["ended_at"],
            heartbeat_at=row["heartbeat_at"], error=row["error"],
            cancel_requested=bool(row["cancel_requested"]),
            progress=progress_from_json(row["progress"]),
            best_val_acc=row["best_val_acc"], best_stage=row["best_stage"],
            best_epoch=row["best_epoch"],
            best_checkpoint=str(self.files(row["id"]).resolve(best)) if best else None,
            test_acc=row["test_acc"], last_step=row["last_step"],
            results=results_from_json(row["results"]),
            executor=row["executor"], job_id=row["job_id"],
        )

    def files(self, run_id: str) -> RunFiles:
        """Every path in a run's folder."""
        return self.layout.run(run_id)

    def run_dir(self, run_id: str) -> Path:
        return self.files(run_id).folder

    # ---------------------------------------------------------------- runs

    def create_run(self, config: RunConfig, name: str = "", group: str = "") -> Run:
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        now = time.time()
        with self._write() as con:
            con.execute(
                "INSERT INTO runs (id, name, grp, status, config, created_at) VALUES (?,?,?,?,?,?)",
                (run_id, name or run_id, group, "queued", config_to_json(config), now),
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
                (now, now, socket.gethostname(), pid, process_identity(pid), run_id))
            return cur.rowcount > 0

    def set_pid(self, run_id: str, pid: int) -> None:
        with self._write() as con:
            con.execute("UPDATE runs SET pid=?, pid_start=?, host=? WHERE id=?",
                        (pid, process_identity(pid), socket.gethostname(), run_id))

    def set_job(self, run_id: str, executor: str, job_id: str | None, host: str | None) -> None:
        """Record where a run runs: its executor, its job id there, and the host when known
        (None keeps the host already recorded)."""
        with self._write() as con:
            con.execute("UPDATE runs SET executor=?, job_id=?, host=COALESCE(?, host) WHERE id=?",
                        (executor, job_id, host, run_id))

    def heartbeat(self, run_id: str, progress: RunProgress | None = None) -> bool:
        """Record liveness (and progress). Returns whether the worker should stop:
        cancellation requested, or the run is no longer 'running'."""
        with self._write() as con:
            if progress is None:
                con.execute("UPDATE runs SET heartbeat_at=? WHERE id=?", (time.time(), run_id))
            else:
                con.execute("UPDATE runs SET heartbeat_at=?, progress=? WHERE id=?",
                            (time.time(), progress_to_json(progress), run_id))
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

    def set_best(self, run_id: str, val_acc: float, stage: int, epoch: int,
                 checkpoint: str | os.PathLike[str] | None) -> None:
        """Record the best epoch so far and its checkpoint (a path in the run's folder; the
        record keeps it relative to that folder), or no checkpoint."""
        name = self.files(run_id).relative(checkpoint) if checkpoint else None
        with self._write() as con:
            con.execute(
                "UPDATE runs SET best_val_acc=?, best_stage=?, best_epoch=?, best_checkpoint=? WHERE id=?",
                (val_acc, stage, epoch, name, run_id))

    def set_last_step(self, run_id: str, step: int) -> None:
        """Record where a resume picks up: the global step of the last saved epoch."""
        with self._write() as con:
            con.execute("UPDATE runs SET last_step=? WHERE id=?", (step, run_id))

    def set_results(self, run_id: str, results: RunResults, test_acc: float | None = None) -> None:
        """Replace the run's results (and set test_acc when given)."""
        with self._write() as con:
            con.execute("UPDATE runs SET results=?, test_acc=COALESCE(?, test_acc) WHERE id=?",
                        (results_to_json(results), test_acc, run_id))

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
        resumable point (last_step, the step of the last saved epoch) are dropped in the
        same transaction, so no reader ever sees the rows the resumed worker is about to
        write again. Returns whether the run was requeued."""
        with self._write() as con:
            row = con.execute("SELECT last_step FROM runs WHERE id=? AND status IN "
                              "('failed','cancelled')", (run_id,)).fetchone()
            if row is None:
                return False
            con.execute("DELETE FROM metrics WHERE run_id=? AND step>?", (run_id, row[0]))
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

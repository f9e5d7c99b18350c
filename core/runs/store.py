"""The run store: one schema and one set of queries (SQLAlchemy Core) over SQLite, the embedded
default, or PostgreSQL, shared by the dashboards, command lines and workers of several
machines. Reached only through this module: all SQL of the project is here.

Which database: a URL in $FINETUNE_LAB_DB (`postgresql://user:pw@host/db`; plain
`postgresql://` is mapped to the psycopg 3 driver), else SQLite in WAL mode under the data
directory (core.settings). Run folders (checkpoints, logs, exports) live under the artifact
root; the store records paths relative to it.

SQLite: every call opens a short-lived connection (NullPool), so any number of processes can
share the file; writes take the write lock up front (BEGIN IMMEDIATE) and wait on a busy
timeout, which is what keeps several writers and many readers from ever seeing "database is
locked". PostgreSQL: one pooled Engine per URL and process; writes are READ COMMITTED
transactions; claiming a queued run locks rows with FOR UPDATE SKIP LOCKED under an advisory
lock, so the running-limit holds across machines.

Metric rows are read incrementally by a per-run sequence number (`seq`), not the table's
global id: PostgreSQL hands out ids when a row is inserted, not when it commits, so a global
id cursor can skip a row whose transaction commits late. `seq` is allocated from a counter on
the run's row, whose row lock makes the writers of one run commit in `seq` order.

Everything returned is a typed entity (core.runs.entities), never a row or a dict: JSON is
only the storage format inside a few columns, converted here by one to/from pair per entity.
The schema changes only through MIGRATIONS, numbered by SQLite's `user_version` or, on
PostgreSQL, the `schema_version` table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool import NullPool

from core import config as cfgmod
from core.atomic import atomic_write_json
from core.config import RunConfig, check_text_limits
from core.process import local_user, process_identity
from core.runs.entities import (
    ACTIVE,
    DONE,
    KINDS,
    STATUSES,
    Experiment,
    MetricRow,
    Recipe,
    Run,
    RunProgress,
    RunResults,
    SplitSizes,
    StageWeightChange,
)
from core.settings import (
    ARTIFACTS_ENV,
    DATA_DIR_ENV,
    DB_ENV,
    DEFAULT_DATA_DIR,
    RunFiles,
    StoreLayout,
    artifact_root,
    data_dir,
    store_url,
)

__all__ = ["ACTIVE", "DATA_DIR_ENV", "DB_ENV", "DEFAULT_DATA_DIR", "DONE", "STATUSES",
           "Experiment", "ExperimentNotFound", "MetricRow", "NewerSchemaError", "Recipe", "Run",
           "RunProgress", "RunResults", "RunStore", "SplitSizes", "StageWeightChange",
           "StoreError", "data_dir", "database_url", "dispose_engines", "store_failure_reason"]

log = logging.getLogger("finetune_lab.store")
BUSY_TIMEOUT_S = 30.0  # how long a writer waits for the lock before giving up
PG_CONNECT_TIMEOUT_S = 10  # how long opening a PostgreSQL connection may take
# PostgreSQL advisory lock keys (any two distinct 64-bit numbers of our own).
_MIGRATION_LOCK = 0x46544C_0001
_CLAIM_LOCK = 0x46544C_0002


class StoreError(RuntimeError):
    """The store cannot be used (unwritable directory, full disk, corrupt file, unreachable
    or refusing database server)."""


class ExperimentNotFound(KeyError):
    """No experiment has this id."""


class NewerSchemaError(StoreError):
    """The database was written by a newer version of the lab: it is refused, untouched."""

    def __init__(self, found: int):
        super().__init__(f"this store was written by a newer version (schema {found}, this one "
                         f"knows {SCHEMA_VERSION}): upgrade")
        self.found = found


# ---------------------------------------------------------------- the schema
# The tables as the migrations below leave them: what every query is built from.

metadata = sa.MetaData()

runs = sa.Table(
    "runs", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("grp", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer),
    sa.Column("pid_start", sa.Text),
    sa.Column("host", sa.Text),
    sa.Column("executor", sa.Text),
    sa.Column("job_id", sa.Text),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("started_at", sa.Double),
    sa.Column("ended_at", sa.Double),
    sa.Column("heartbeat_at", sa.Double),
    sa.Column("error", sa.Text),
    sa.Column("cancel_requested", sa.Integer, nullable=False),
    sa.Column("progress", sa.Text, nullable=False),
    sa.Column("best_val_acc", sa.Double),
    sa.Column("best_stage", sa.Integer),
    sa.Column("best_epoch", sa.Integer),
    sa.Column("best_checkpoint", sa.Text),
    sa.Column("test_acc", sa.Double),
    sa.Column("results", sa.Text, nullable=False),
    sa.Column("last_step", sa.Integer, nullable=False),
    sa.Column("note", sa.Text, nullable=False),
    # The last metric `seq` handed out for this run (never reused, like an autoincrement).
    sa.Column("metric_seq", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),  # one of entities.KINDS
    sa.Column("started_by", sa.Text, nullable=False),  # entities.Run.started_by
)

metrics = sa.Table(
    "metrics", metadata,
    sa.Column("id", sa.BigInteger, primary_key=True),  # global; not a read cursor
    sa.Column("run_id", sa.Text, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),  # per run, in commit order
    sa.Column("stage", sa.Integer, nullable=False),
    sa.Column("epoch", sa.Double, nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("key", sa.Text, nullable=False),
    sa.Column("value", sa.Double, nullable=False),
    sa.Column("time", sa.Double, nullable=False),
    # The token of the write that added the row (log_metrics' `batch`): a write retried
    # after its commit's acknowledgement was lost finds its rows already there.
    sa.Column("batch", sa.Text),
)

run_tags = sa.Table(
    "run_tags", metadata,
    sa.Column("run_id", sa.Text, primary_key=True),
    sa.Column("tag", sa.Text, primary_key=True),
)

experiments = sa.Table(
    "experiments", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("seeds", sa.Text, nullable=False),  # JSON list of ints
    sa.Column("recipes", sa.Text, nullable=False),  # JSON list of {name, group, config}
    sa.Column("note", sa.Text, nullable=False),
    sa.Column("tags", sa.Text, nullable=False),  # JSON list, sorted (normalize_tags)
)

# PostgreSQL only: SQLite keeps the version in its file header (PRAGMA user_version).
schema_version = sa.Table("schema_version", sa.MetaData(),
                          sa.Column("version", sa.Integer, nullable=False))


# ---------------------------------------------------------------- schema migrations
# Each step moves the schema from version i to i + 1. Steps run in one write transaction with
# the version bump (PostgreSQL's DDL is transactional; SQLite's too), so a crash or a second
# process never sees half a migration. A SQLite database written before versioning
# (user_version 0) may already have some of these changes, so the early steps check before
# they change. The DDL is written once, in SQLite's words; _ddl translates the two types
# PostgreSQL spells differently.


def _ddl(con: Connection, sql: str) -> None:
    if con.dialect.name == "postgresql":
        sql = sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT",
                          "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
        sql = re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)  # PostgreSQL's REAL is 4 bytes
    con.exec_driver_sql(sql)


def _columns(con: Connection, table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(con).get_columns(table)}


def _m1_initial(con: Connection) -> None:
    """The tables as first created."""
    _ddl(con, """
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
    _ddl(con, "CREATE INDEX IF NOT EXISTS runs_status ON runs(status, created_at)")
    _ddl(con, """
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
    _ddl(con, "CREATE INDEX IF NOT EXISTS metrics_run ON metrics(run_id, id)")


def _m2_pid_start(con: Connection) -> None:
    """The worker process's start time, so a reused pid is not mistaken for the worker."""
    if "pid_start" not in _columns(con, "runs"):
        _ddl(con, "ALTER TABLE runs ADD COLUMN pid_start TEXT")


def _m3_last_step_column(con: Connection) -> None:
    """The resume point moves out of the results JSON into its own column."""
    _ddl(con, "ALTER TABLE runs ADD COLUMN last_step INTEGER NOT NULL DEFAULT -1")
    for run_id, results in con.execute(sa.text("SELECT id, results FROM runs")).all():
        data = _json_object(results)
        if "last_step" in data:
            step = data.pop("last_step")
            con.execute(sa.text("UPDATE runs SET last_step=:step, results=:results WHERE id=:id"),
                        {"step": int(step) if isinstance(step, (int, float)) else -1,
                         "results": json.dumps(data), "id": run_id})


def _m4_relative_best_checkpoint(con: Connection) -> None:
    """best_checkpoint was an absolute path; it becomes relative to the run's folder (so the
    data directory can move). Process start times change from /proc ticks to psutil's
    creation time: old ones cannot be compared, so they are dropped (the pid still counts)."""
    rows = con.execute(sa.text(
        "SELECT id, best_checkpoint FROM runs WHERE best_checkpoint IS NOT NULL")).all()
    for run_id, path in rows:
        p = Path(path)
        if p.is_absolute() and p.parent.name == run_id:
            con.execute(sa.text("UPDATE runs SET best_checkpoint=:name WHERE id=:id"),
                        {"name": p.name, "id": run_id})
    con.execute(sa.text("UPDATE runs SET pid_start=NULL"))


def _m5_executor_and_job(con: Connection) -> None:
    """Where a run executes: the executor ("local" or "ray") and its job id there (a Ray
    submission id), beside the host."""
    _ddl(con, "ALTER TABLE runs ADD COLUMN executor TEXT")
    _ddl(con, "ALTER TABLE runs ADD COLUMN job_id TEXT")


def _m6_notes_and_tags(con: Connection) -> None:
    """A free-text note per run, and tags in a side table (so runs filter by tag in SQL)."""
    _ddl(con, "ALTER TABLE runs ADD COLUMN note TEXT NOT NULL DEFAULT ''")
    _ddl(con, """
        CREATE TABLE run_tags (
            run_id TEXT NOT NULL,
            tag TEXT NOT NULL,
            PRIMARY KEY (run_id, tag)
        )""")
    _ddl(con, "CREATE INDEX run_tags_tag ON run_tags(tag)")


def _m7_metric_seq(con: Connection) -> None:
    """Incremental reads move from the global id to a per-run sequence number (see the module
    docstring). Existing rows keep their id as their seq: SQLite committed them in id order,
    and readers' cursors stay valid."""
    _ddl(con, "ALTER TABLE runs ADD COLUMN metric_seq BIGINT NOT NULL DEFAULT 0")
    _ddl(con, "ALTER TABLE metrics ADD COLUMN seq BIGINT NOT NULL DEFAULT 0")
    _ddl(con, "UPDATE metrics SET seq=id")
    _ddl(con, "UPDATE runs SET metric_seq=COALESCE("
              "(SELECT MAX(seq) FROM metrics WHERE metrics.run_id=runs.id), 0)")
    _ddl(con, "DROP INDEX IF EXISTS metrics_run")
    _ddl(con, "CREATE UNIQUE INDEX metrics_run_seq ON metrics(run_id, seq)")


def _m8_run_kind(con: Connection) -> None:
    """A run has a kind (entities.KINDS), so lists show what the user asked for. Range tests
    recorded before kinds existed are found by the name the LR finder gave them."""
    _ddl(con, "ALTER TABLE runs ADD COLUMN kind TEXT NOT NULL DEFAULT 'training'")
    con.execute(sa.text("UPDATE runs SET kind='lr_finder' WHERE name LIKE :prefix"),
                {"prefix": "LR finder · %"})
    _ddl(con, "CREATE INDEX runs_kind ON runs(kind, created_at)")


def _m9_metric_batches(con: Connection) -> None:
    """Metric rows carry the token of the write that added them, so a worker that retries a
    write whose commit went through but whose acknowledgement was lost (the connection
    dropped at COMMIT) finds its rows there instead of adding them twice."""
    _ddl(con, "ALTER TABLE metrics ADD COLUMN batch TEXT")
    _ddl(con, "CREATE INDEX metrics_run_batch ON metrics(run_id, batch)")


def _m10_experiments(con: Connection) -> None:
    """Experiments become rows beside the runs they group (they were JSON files under the
    artifact root, which a second dashboard or a search could not query). The files are
    imported when the store first opens (RunStore._import_experiment_files)."""
    _ddl(con, """
        CREATE TABLE experiments (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            created_at REAL NOT NULL,
            seeds TEXT NOT NULL,
            recipes TEXT NOT NULL,
            note TEXT NOT NULL DEFAULT '',
            tags TEXT NOT NULL DEFAULT '[]'
        )""")
    _ddl(con, "CREATE INDEX experiments_created ON experiments(created_at)")


def _m11_started_by(con: Connection) -> None:
    """Who started a run (issue 21): earlier runs are of nobody known ("")."""
    _ddl(con, "ALTER TABLE runs ADD COLUMN started_by TEXT NOT NULL DEFAULT ''")


MIGRATIONS: tuple[Callable[[Connection], None], ...] = (
    _m1_initial, _m2_pid_start, _m3_last_step_column, _m4_relative_best_checkpoint,
    _m5_executor_and_job, _m6_notes_and_tags, _m7_metric_seq, _m8_run_kind,
    _m9_metric_batches, _m10_experiments, _m11_started_by)
SCHEMA_VERSION = len(MIGRATIONS)


# ---------------------------------------------------------------- engines


def database_url(url: str | URL) -> URL:
    """A store URL as SQLAlchemy needs it: `postgresql://` and `postgres://` name the
    psycopg 3 driver. Raises StoreError for a URL that is not SQLite or PostgreSQL."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise StoreError(f"{DB_ENV} is not a database URL: {exc}") from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise StoreError(f"the run store runs on SQLite or PostgreSQL, not "
                         f"{parsed.get_backend_name()} ({DB_ENV})")
    return parsed


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def _sqlite_on_connect(dbapi_con: Any, _record: Any) -> None:
    # The driver's own implicit BEGIN would be deferred: _write says BEGIN IMMEDIATE itself.
    dbapi_con.isolation_level = None
    dbapi_con.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    dbapi_con.execute("PRAGMA synchronous=NORMAL")  # safe in WAL mode; much faster commits


def _engine(url: URL) -> Engine:
    """One Engine per database and process, so PostgreSQL connections are pooled across
    every RunStore a process makes (pages make one per script run)."""
    key = url.render_as_string(hide_password=False)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            if url.get_backend_name() == "sqlite":
                # A connection per call, as before: nothing held open between calls, which
                # keeps the file's locks short and forked processes safe.
                engine = sa.create_engine(url, poolclass=NullPool,
                                          connect_args={"timeout": BUSY_TIMEOUT_S,
                                                        "check_same_thread": False})
                sa.event.listen(engine, "connect", _sqlite_on_connect)
            else:
                engine = sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=20,
                                          connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S})
            _engines[key] = engine
        return engine


def dispose_engines() -> None:
    """Close every pooled connection of this process (before dropping a test database, or
    in a forked child, which must not share its parent's connections)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def _forget_engines_in_child() -> None:
    global _engines_lock
    _engines_lock = threading.Lock()  # the fork may have happened while another thread held it
    for engine in list(_engines.values()):
        engine.dispose(close=False)  # the parent still uses those sockets
    _engines.clear()


os.register_at_fork(after_in_child=_forget_engines_in_child)


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

def experiment_to_json(exp: Experiment) -> dict[str, str]:
    """The JSON columns of an experiment's row."""
    return {"seeds": json.dumps(list(exp.seeds)),
            "recipes": json.dumps([{"name": r.name, "group": r.group,
                                    "config": cfgmod.to_dict(r.config)} for r in exp.recipes]),
            "tags": json.dumps(list(exp.tags))}


def experiment_from_record(record: dict[str, Any]) -> Experiment:
    """An experiment from its fields, the JSON columns parsed (also the form of the JSON
    files experiments were kept in before migration 10; those written before notes and
    tags existed have neither). Raises ValueError for a malformed record."""
    try:
        return Experiment(
            id=str(record["id"]), name=str(record["name"]),
            created_at=float(record["created_at"]),
            seeds=tuple(int(s) for s in record["seeds"]),
            recipes=tuple(Recipe(str(r["name"]), str(r["group"]),
                                 cfgmod.from_dict(r["config"], validate_values=False))
                          for r in record["recipes"]),
            note=str(record.get("note") or ""),
            tags=normalize_tags([str(t) for t in record.get("tags") or ()]))
    except (KeyError, TypeError, ValueError) as exc:  # ConfigError is a ValueError
        raise ValueError(f"experiment record is malformed ({exc})") from None


def _experiment_from_row(row: Any) -> Experiment:
    return experiment_from_record({
        "id": row["id"], "name": row["name"], "created_at": row["created_at"],
        "seeds": json.loads(row["seeds"]), "recipes": json.loads(row["recipes"]),
        "note": row["note"], "tags": json.loads(row["tags"])})


def normalize_tags(tags: Sequence[str]) -> tuple[str, ...]:
    """Tags as stored: trimmed, no empty ones, no repeats, sorted."""
    return tuple(sorted({t.strip() for t in tags if t.strip()}))


class RunStore:
    """The run store of a data directory `root` (default $FINETUNE_LAB_DATA), in the database
    `url` names (default $FINETUNE_LAB_DB, else SQLite under `root`), with run folders under
    `artifacts` (default $FINETUNE_LAB_ARTIFACTS, else `root`)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *,
                 url: str | URL | None = None,
                 artifacts: str | os.PathLike[str] | None = None):
        data_directory = Path(root) if root is not None else data_dir()
        self.layout = StoreLayout(data_directory, Path(artifacts) if artifacts is not None
                                  else artifact_root(data_directory))
        self.root = self.layout.root
        url = url if url is not None else store_url()
        self._url = (database_url(url) if url is not None
                     else URL.create("sqlite", database=str(self.layout.database)))
        self.is_sqlite = self._url.get_backend_name() == "sqlite"
        # The SQLite file (a sqlite:/// URL may name another one); unused on PostgreSQL.
        self.db_path = (Path(self._url.database) if self.is_sqlite and self._url.database
                        else self.layout.database)
        try:
            if self.is_sqlite:
                self.db_path.parent.mkdir(parents=True, exist_ok=True)
            self.engine = _engine(self._url)
            version = self.schema_version()  # a read: a newer store is refused untouched
            if version > SCHEMA_VERSION:
                raise NewerSchemaError(version)
            if self.is_sqlite:
                with self.engine.connect() as con:
                    con.exec_driver_sql("PRAGMA journal_mode=WAL")
            self._migrate()
        except NewerSchemaError:
            raise
        except (OSError, sa.exc.SQLAlchemyError, StoreError) as exc:
            hint = (f"Check that the folder is writable and the disk has space, or point "
                    f"{DATA_DIR_ENV} at another folder." if self.is_sqlite else
                    f"Check that the server is running and that {DB_ENV} names it, with a "
                    f"user that may create tables.")
            raise StoreError(f"Cannot use the run store at {self.location}: "
                             f"{_reason(exc)}. {hint}") from exc
        self._import_experiment_files()

    # ---------------------------------------------------------------- where it is

    @property
    def url(self) -> str:
        """The database URL, password included: what another process needs to open this
        store (see `environment`). Show `location` instead."""
        return self._url.render_as_string(hide_password=False)

    @property
    def location(self) -> str:
        """Where the store is, for messages: the SQLite file, or the URL without password."""
        return str(self.db_path) if self.is_sqlite else self._url.render_as_string(
            hide_password=True)

    def environment(self) -> dict[str, str]:
        """The environment variables that point another process (a worker, a Ray job) at
        this store and artifact root."""
        return {DATA_DIR_ENV: str(self.root), DB_ENV: self.url,
                ARTIFACTS_ENV: str(self.layout.artifacts)}

    # ---------------------------------------------------------------- plumbing

    def schema_version(self) -> int:
        """The database's schema version (SCHEMA_VERSION once migrated)."""
        with self.engine.connect() as con:
            return self._version(con)

    def _version(self, con: Connection) -> int:
        if self.is_sqlite:
            return int(con.exec_driver_sql("PRAGMA user_version").scalar_one())
        if not sa.inspect(con).has_table(schema_version.name):
            return 0
        return int(con.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0)

    def _migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION, one numbered step at a time."""
        if self.schema_version() >= SCHEMA_VERSION:
            return
        with self._write() as con:  # re-read under the lock: another process may have won
            if not self.is_sqlite:
                con.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
                con.exec_driver_sql(
                    f"CREATE TABLE IF NOT EXISTS {schema_version.name} (version INTEGER NOT NULL)")
            version = self._version(con)
            if version > SCHEMA_VERSION:  # a newer version migrated it meanwhile
                raise NewerSchemaError(version)
            for number in range(version, SCHEMA_VERSION):
                MIGRATIONS[number](con)
                log.info("run store %s: schema version %d", self.location, number + 1)
            if version >= SCHEMA_VERSION:
                return
            if self.is_sqlite:
                con.exec_driver_sql(f"PRAGMA user_version={SCHEMA_VERSION}")
            else:
                con.execute(schema_version.delete())
                con.execute(schema_version.insert().values(version=SCHEMA_VERSION))

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction. On SQLite it takes the lock at BEGIN (IMMEDIATE): a deferred
        transaction that upgrades from read to write can fail with SQLITE_BUSY without
        waiting. Database errors become StoreError."""
        try:
            with self.engine.connect() as con, con.begin():
                if self.is_sqlite:
                    try:
                        con.exec_driver_sql("BEGIN IMMEDIATE")
                    except sa.exc.OperationalError as exc:
                        raise StoreError(f"run store is busy or unwritable: {_reason(exc)}") from exc
                yield con
        except sa.exc.DatabaseError as exc:
            if not _is_store_failure(exc):
                raise
            hint = (f"If the disk is full, free space; if the folder is read-only, set "
                    f"{DATA_DIR_ENV}." if self.is_sqlite else
                    f"Check that the server at {self.location} is running and has space.")
            raise StoreError(f"Could not write to the run store ({_reason(exc)}). {hint}") from exc

    def _read(self, statement: sa.Executable) -> list[sa.Row]:
        try:
            with self.engine.connect() as con:
                return list(con.execute(statement).all())
        except sa.exc.DatabaseError as exc:
            if not _is_store_failure(exc):
                raise
            raise StoreError(f"Could not read the run store at {self.location} "
                             f"({_reason(exc)}).") from exc

    def _tags(self, run_ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
        tags: dict[str, list[str]] = {}
        if run_ids:
            for run_id, tag in self._read(sa.select(run_tags.c.run_id, run_tags.c.tag)
                                          .where(run_tags.c.run_id.in_(run_ids))
                                          .order_by(run_tags.c.tag)):
                tags.setdefault(run_id, []).append(tag)
        return {k: tuple(v) for k, v in tags.items()}

    def _runs(self, rows: Sequence[sa.Row]) -> list[Run]:
        tags = self._tags([r.id for r in rows])
        return [self._run(r._mapping, tags.get(r.id, ())) for r in rows]

    def _run(self, row: Any, tags: tuple[str, ...]) -> Run:
        config, config_error = config_from_json(row["config"])
        best = row["best_checkpoint"]
        return Run(
            id=row["id"], name=row["name"], group=row["grp"], status=row["status"],
            config=config, config_error=config_error, created_at=row["created_at"], pid=row["pid"],
            pid_start=row["pid_start"],
            host=row["host"], executor=row["executor"], job_id=row["job_id"],
            started_at=row["started_at"], ended_at=row["ended_at"],
            heartbeat_at=row["heartbeat_at"], error=row["error"],
            cancel_requested=bool(row["cancel_requested"]),
            progress=progress_from_json(row["progress"]),
            best_val_acc=row["best_val_acc"], best_stage=row["best_stage"],
            best_epoch=row["best_epoch"],
            best_checkpoint=str(self.files(row["id"]).resolve(best)) if best else None,
            test_acc=row["test_acc"], last_step=row["last_step"],
            results=results_from_json(row["results"]),
            note=row["note"], tags=tags, kind=row["kind"],
            started_by=row["started_by"],
        )

    def files(self, run_id: str) -> RunFiles:
        """Every path in a run's folder (under the artifact root)."""
        return self.layout.run(run_id)

    def run_dir(self, run_id: str) -> Path:
        return self.files(run_id).folder

    # ---------------------------------------------------------------- runs

    def create_run(self, config: RunConfig, name: str = "", group: str = "",
                   kind: str = "training", job_request: dict[str, Any] | None = None,
                   started_by: str | None = None) -> Run:
        """Queue a new run, recorded as started by `started_by` (a signed-in e-mail), else by
        the user account this process runs as. A tool's job (an LR finder, an export) passes its `job_request`:
        it is written into the run's folder before the row exists, so a worker that claims
        the run the moment it is queued always finds it."""
        if kind not in KINDS:
            raise ValueError(f"unknown run kind {kind!r}: one of {', '.join(KINDS)}")
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        if job_request is not None:
            self.run_dir(run_id).mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.files(run_id).job_request, job_request)
        with self._write() as con:
            con.execute(runs.insert().values(
                id=run_id, name=name or run_id, grp=group, status="queued", kind=kind,
                started_by=started_by or local_user(),
                config=config_to_json(config), created_at=time.time(), cancel_requested=0,
                progress=progress_to_json(RunProgress()), results=results_to_json(RunResults()),
                last_step=-1, note="", metric_seq=0))
        self.run_dir(run_id).mkdir(parents=True, exist_ok=True)
        return self.get_run(run_id)  # type: ignore[return-value]

    def get_run(self, run_id: str) -> Run | None:
        rows = self._read(sa.select(runs).where(runs.c.id == run_id))
        return self._runs(rows)[0] if rows else None

    def list_runs(self, statuses: Sequence[str] = (), group: str | None = None,
                  tag: str | None = None, kinds: Sequence[str] = ()) -> list[Run]:
        """Runs, newest first, optionally filtered by status, group, tag and kind (() : all
        kinds; lists of results pass entities.TRAINING_KINDS)."""
        query = sa.select(runs)
        if statuses:
            query = query.where(runs.c.status.in_(list(statuses)))
        if kinds:
            query = query.where(runs.c.kind.in_(list(kinds)))
        if group is not None:
            query = query.where(runs.c.grp == group)
        if tag is not None:
            query = query.where(runs.c.id.in_(
                sa.select(run_tags.c.run_id).where(run_tags.c.tag == tag)))
        return self._runs(self._read(query.order_by(runs.c.created_at.desc())))

    def claim_next_queued(self, max_running: int) -> Run | None:
        """Atomically move the oldest queued run to running if fewer than `max_running`
        runs are running. Returns the claimed run, or None. Safe between processes and
        machines: SQLite serialises writers (BEGIN IMMEDIATE); on PostgreSQL an advisory
        lock serialises claimers (so the count and the claim are one step) and the queued
        row is taken FOR UPDATE SKIP LOCKED."""
        with self._write() as con:
            if not self.is_sqlite:
                con.execute(sa.select(sa.func.pg_advisory_xact_lock(_CLAIM_LOCK)))
            running = con.execute(sa.select(sa.func.count()).select_from(runs)
                                  .where(runs.c.status == "running")).scalar_one()
            if running >= max_running:
                return None
            run_id = con.execute(
                sa.select(runs.c.id).where(runs.c.status == "queued")
                .order_by(runs.c.created_at, runs.c.id).limit(1)
                .with_for_update(skip_locked=True)).scalar()
            if run_id is None:
                return None
            now = time.time()
            con.execute(runs.update().where(runs.c.id == run_id).values(
                status="running", started_at=now, heartbeat_at=now, host=socket.gethostname()))
        return self.get_run(run_id)

    def claim_run_now(self, run_id: str, pid: int) -> bool:
        """Claim a specific queued run for the calling process (foreground CLI runs skip
        the queue). Returns whether it was claimed."""
        now = time.time()
        with self._write() as con:
            result = con.execute(
                runs.update().where(runs.c.id == run_id, runs.c.status == "queued").values(
                    status="running", started_at=now, heartbeat_at=now,
                    host=socket.gethostname(), pid=pid, pid_start=process_identity(pid)))
            return result.rowcount > 0

    def set_pid(self, run_id: str, pid: int) -> None:
        with self._write() as con:
            con.execute(runs.update().where(runs.c.id == run_id).values(
                pid=pid, pid_start=process_identity(pid), host=socket.gethostname()))

    def set_job(self, run_id: str, executor: str, job_id: str | None,
                host: str | None = None) -> None:
        """Record where a run executes: the executor ("local" or "ray"), its job id there
        (e.g. the Ray submission id), and the host when known (None keeps the recorded one)."""
        values: dict[str, Any] = {"executor": executor, "job_id": job_id}
        if host is not None:
            values["host"] = host
        with self._write() as con:
            con.execute(runs.update().where(runs.c.id == run_id).values(**values))

    def heartbeat(self, run_id: str, progress: RunProgress | None = None) -> bool:
        """Record liveness (and progress). Returns whether the worker should stop:
        cancellation requested, or the run is no longer 'running'."""
        values: dict[str, Any] = {"heartbeat_at": time.time()}
        if progress is not None:
            values["progress"] = progress_to_json(progress)
        with self._write() as con:
            con.execute(runs.update().where(runs.c.id == run_id).values(**values))
            row = con.execute(sa.select(runs.c.cancel_requested, runs.c.status)
                              .where(runs.c.id == run_id)).first()
        # A run someone else settled (declared dead, deleted) must stop too.
        return row is None or bool(row[0]) or row[1] != "running"

    def cancel_requested(self, run_id: str) -> bool:
        rows = self._read(sa.select(runs.c.cancel_requested).where(runs.c.id == run_id))
        return bool(rows and rows[0][0])

    def request_cancel(self, run_id: str) -> Run | None:
        """Queued runs are cancelled at once; running ones are asked to stop."""
        with self._write() as con:
            con.execute(runs.update().where(runs.c.id == run_id, runs.c.status == "queued")
                        .values(status="cancelled", ended_at=time.time(),
                                error="cancelled before it started"))
            con.execute(runs.update().where(runs.c.id == run_id, runs.c.status == "running")
                        .values(cancel_requested=1))
        return self.get_run(run_id)

    def set_best(self, run_id: str, val_acc: float, stage: int, epoch: int,
                 checkpoint: str | os.PathLike[str] | None) -> None:
        """Record the best epoch so far and its checkpoint (a path in the run's folder; the
        record keeps it relative to that folder), or no checkpoint."""
        name = self.files(run_id).relative(checkpoint) if checkpoint else None
        with self._write() as con:
            con.execute(runs.update().where(runs.c.id == run_id).values(
                best_val_acc=val_acc, best_stage=stage, best_epoch=epoch, best_checkpoint=name))

    def set_note(self, run_id: str, text: str) -> None:
        """Replace the run's note (free text; "" clears it). Raises ConfigError over
        NOTE_MAX_CHARS."""
        check_text_limits(note=text)
        with self._write() as con:
            con.execute(runs.update().where(runs.c.id == run_id).values(note=text))

    def set_tags(self, run_id: str, tags: Sequence[str]) -> tuple[str, ...]:
        """Replace the run's tags. Tags are trimmed; empty ones and repeats are dropped.
        Returns the tags as stored (sorted); () for a run that does not exist. Raises
        ConfigError for a tag over TAG_MAX_CHARS or more than TAGS_MAX tags."""
        check_text_limits(tags=tags)
        clean = normalize_tags(tags)
        with self._write() as con:
            # Locks the run's row on PostgreSQL: two concurrent replacements do not merge.
            exists = con.execute(sa.select(runs.c.id).where(runs.c.id == run_id)
                                 .with_for_update()).first()
            if exists is None:
                return ()
            con.execute(run_tags.delete().where(run_tags.c.run_id == run_id))
            if clean:
                con.execute(run_tags.insert(), [{"run_id": run_id, "tag": t} for t in clean])
        return clean

    def all_tags(self) -> list[str]:
        """Every tag in use, sorted (for filter choices)."""
        return [r[0] for r in self._read(sa.select(run_tags.c.tag).distinct()
                                         .order_by(run_tags.c.tag))]

    def set_last_step(self, run_id: str, step: int) -> None:
        """Record where a resume picks up: the global step of the last saved epoch."""
        with self._write() as con:
            con.execute(runs.update().where(runs.c.id == run_id).values(last_step=step))

    def set_results(self, run_id: str, results: RunResults, test_acc: float | None = None) -> None:
        """Replace the run's results (and set test_acc when given)."""
        values: dict[str, Any] = {"results": results_to_json(results)}
        if test_acc is not None:
            values["test_acc"] = test_acc
        with self._write() as con:
            con.execute(runs.update().where(runs.c.id == run_id).values(**values))

    def finish_run(self, run_id: str, status: str, error: str | None = None,
                   only_if_running: bool = False) -> bool:
        """Move a run to a final status. Returns False when `only_if_running` and it
        was no longer running (someone else already settled it)."""
        assert status in DONE, status
        query = runs.update().where(runs.c.id == run_id)
        if only_if_running:
            query = query.where(runs.c.status == "running")
        with self._write() as con:
            result = con.execute(query.values(status=status, error=error, ended_at=time.time()))
            return result.rowcount > 0

    def requeue(self, run_id: str) -> bool:
        """Put a failed/cancelled run back in the queue (resume). Metric rows past the last
        resumable point (last_step, the step of the last saved epoch) are dropped in the
        same transaction, so no reader ever sees the rows the resumed worker is about to
        write again. Returns whether the run was requeued."""
        with self._write() as con:
            last_step = con.execute(
                sa.select(runs.c.last_step).where(runs.c.id == run_id,
                                                  runs.c.status.in_(("failed", "cancelled")))
                .with_for_update()).scalar()
            if last_step is None:
                return False
            con.execute(metrics.delete().where(metrics.c.run_id == run_id,
                                               metrics.c.step > last_step))
            con.execute(runs.update().where(runs.c.id == run_id).values(
                status="queued", error=None, ended_at=None, pid=None, pid_start=None,
                cancel_requested=0))
            return True

    def delete_run(self, run_id: str) -> None:
        with self._write() as con:
            # The run's row first: a worker logging meanwhile waits, then finds no run and
            # drops its rows, instead of leaving them behind without a run.
            con.execute(sa.select(runs.c.id).where(runs.c.id == run_id).with_for_update())
            con.execute(metrics.delete().where(metrics.c.run_id == run_id))
            con.execute(run_tags.delete().where(run_tags.c.run_id == run_id))
            con.execute(runs.delete().where(runs.c.id == run_id))
        shutil.rmtree(self.run_dir(run_id), ignore_errors=True)

    # ---------------------------------------------------------------- experiments

    def create_experiment(self, exp: Experiment) -> Experiment:
        """Record a new experiment (its id must be new). Returns it as stored."""
        with self._write() as con:
            con.execute(experiments.insert().values(
                id=exp.id, name=exp.name, created_at=exp.created_at, note=exp.note,
                **experiment_to_json(dataclasses.replace(
                    exp, tags=normalize_tags(exp.tags)))))
        return self.get_experiment(exp.id)

    def get_experiment(self, exp_id: str) -> Experiment:
        """The experiment `exp_id`, or ExperimentNotFound. A row that no longer parses
        raises ValueError."""
        rows = self._read(sa.select(experiments).where(experiments.c.id == exp_id))
        if not rows:
            raise ExperimentNotFound(exp_id)
        return _experiment_from_row(rows[0]._mapping)

    def list_experiments(self) -> list[Experiment]:
        """Every experiment, newest first; a row that no longer parses is left out (and
        logged)."""
        out = []
        for row in self._read(sa.select(experiments).order_by(experiments.c.created_at.desc(),
                                                               experiments.c.id.desc())):
            try:
                out.append(_experiment_from_row(row._mapping))
            except (ValueError, json.JSONDecodeError) as exc:
                log.warning("experiment %s left out: %s", row.id, exc)
        return out

    def update_experiment(self, exp_id: str, *, name: str | None = None,
                          note: str | None = None,
                          tags: Sequence[str] | None = None) -> Experiment:
        """Change an experiment's name, note or tags (None: unchanged; tags as on runs).
        Returns it as stored, or ExperimentNotFound."""
        values: dict[str, Any] = {}
        if name is not None:
            values["name"] = name
        if note is not None:
            values["note"] = note
        if tags is not None:
            values["tags"] = json.dumps(list(normalize_tags(tags)))
        with self._write() as con:
            if values:
                found = con.execute(experiments.update().where(experiments.c.id == exp_id)
                                    .values(**values)).rowcount
            else:
                found = con.execute(sa.select(sa.func.count()).select_from(experiments)
                                    .where(experiments.c.id == exp_id)).scalar_one()
            if not found:
                raise ExperimentNotFound(exp_id)
        return self.get_experiment(exp_id)

    def delete_experiment(self, exp_id: str) -> None:
        """Forget the experiment (its runs stay)."""
        with self._write() as con:
            con.execute(experiments.delete().where(experiments.c.id == exp_id))

    def _import_experiment_files(self) -> None:
        """Experiments kept as JSON files under the artifact root (before migration 10)
        become rows, once: each imported file is renamed to `<id>.json.migrated` (kept, so
        nothing is lost); a file that does not parse stays where it is, logged. Several
        processes may do this at once: a row already there is left as it is."""
        folder = self.layout.experiments
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("exp-*.json")):
            try:
                exp = experiment_from_record(json.loads(path.read_text(encoding="utf-8")))
            except FileNotFoundError:
                continue  # another process imported it just now
            except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
                log.warning("experiment file %s not imported: %s", path, exc)
                continue
            row = dict(id=exp.id, name=exp.name, created_at=exp.created_at, note=exp.note,
                       **experiment_to_json(exp))
            with self._write() as con:
                if self.is_sqlite:  # the write lock is the whole database: no one races
                    if con.execute(sa.select(experiments.c.id)
                                   .where(experiments.c.id == exp.id)).first() is None:
                        con.execute(experiments.insert().values(**row))
                else:
                    from sqlalchemy.dialects.postgresql import insert as pg_insert

                    con.execute(pg_insert(experiments).values(**row).on_conflict_do_nothing())
            with contextlib.suppress(FileNotFoundError):
                path.rename(path.with_name(path.name + ".migrated"))
            log.info("experiment %s moved from %s into the run store", exp.id, path)

    # ---------------------------------------------------------------- metrics

    def log_metrics(self, run_id: str, rows: Sequence[tuple[int, float, int, str, float]],
                    batch: str | None = None) -> None:
        """Append rows of (stage, epoch, step, key, value) in one transaction. Rows for a
        run that no longer exists are dropped. `batch`: a token unique to this write (a
        uuid); the same write repeated with the same token adds nothing, so a caller may
        retry a write whose outcome it never heard (the connection dropped at COMMIT)."""
        if not rows:
            return
        with self._write() as con:
            self._append_metrics(con, run_id, rows, batch)

    def _append_metrics(self, con: Connection, run_id: str,
                        rows: Sequence[tuple[int, float, int, str, float]],
                        batch: str | None = None) -> None:
        """Insert metric rows inside the write transaction `con`. Their `seq` numbers come
        from the run's counter: updating it locks the run's row until commit, so two writers
        of one run (a worker declared dead that still runs, and its resumed successor)
        commit in seq order and an incremental reader never skips a row."""
        if batch is not None:
            # The run's row first (SQLite holds the whole database already): a first attempt
            # still committing on a dropped connection finishes before this looks.
            if not self.is_sqlite:
                con.execute(sa.select(runs.c.id).where(runs.c.id == run_id).with_for_update())
            if con.execute(sa.select(metrics.c.seq).where(
                    metrics.c.run_id == run_id, metrics.c.batch == batch).limit(1)).first():
                return
        last = con.execute(
            runs.update().where(runs.c.id == run_id)
            .values(metric_seq=runs.c.metric_seq + len(rows))
            .returning(runs.c.metric_seq)).scalar()
        if last is None:
            return
        first, now = last - len(rows) + 1, time.time()
        con.execute(metrics.insert(), [
            {"run_id": run_id, "seq": first + i, "stage": int(s), "epoch": float(e),
             "step": int(st), "key": k, "value": float(v), "time": now, "batch": batch}
            for i, (s, e, st, k, v) in enumerate(rows)])

    def truncate_metrics(self, run_id: str, after_step: int, stage: int | None = None) -> None:
        """Drop rows past `after_step` (a resumed run replays from its last checkpoint).
        With `stage`, rows at `after_step` of later stages go too: a stage's first rows
        share the step of the previous stage's last epoch."""
        with self._write() as con:
            later = metrics.c.step > after_step
            if stage is not None:
                later = later | ((metrics.c.step == after_step) & (metrics.c.stage > stage))
            con.execute(metrics.delete().where(metrics.c.run_id == run_id, later))

    def metrics(self, run_id: str, after_id: int = 0, keys: Sequence[str] = ()) -> list[MetricRow]:
        """Metric rows of a run numbered past `after_id`, in order: the streaming read. A
        row's `id` is its number in the run (seq); pass the last one seen."""
        query = sa.select(metrics.c.seq, metrics.c.run_id, metrics.c.stage, metrics.c.epoch,
                          metrics.c.step, metrics.c.key, metrics.c.value, metrics.c.time).where(
            metrics.c.run_id == run_id, metrics.c.seq > after_id)
        if keys:
            query = query.where(metrics.c.key.in_(list(keys)))
        return [MetricRow(id=r.seq, run_id=r.run_id, stage=r.stage, epoch=r.epoch, step=r.step,
                          key=r.key, value=r.value, time=r.time)
                for r in self._read(query.order_by(metrics.c.seq))]


def _is_store_failure(exc: sa.exc.DatabaseError) -> bool:
    """Whether a database error is the store's condition (disk full, locked, server gone,
    corrupt file) rather than a mistake in a query (ProgrammingError, IntegrityError)."""
    return isinstance(exc, sa.exc.OperationalError) or type(exc) is sa.exc.DatabaseError


def store_failure_reason(exc: BaseException) -> str:
    """Why the store failed, in the database's own words (one line): the database error a
    StoreError came from, else its own message."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, sa.exc.DBAPIError):
            return _reason(seen)
        seen = seen.__cause__
    return _reason(exc)


def _reason(exc: BaseException) -> str:
    """The database's own words for an error, without SQLAlchemy's SQL and links."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""Where things live: the settings read from the environment (data directory, artifact root,
run store URL) and the one owner of every file and folder name under them.

Below every other layer of core (no core import but core.atomic, no torch), so the engine,
the run store and the pages all ask this module for a path instead of spelling it.

- The data directory ($FINETUNE_LAB_DATA, default runs/ beside the code) holds the SQLite
  run store when no store URL is set.
- The artifact root ($FINETUNE_LAB_ARTIFACTS, default the data directory) holds what runs
  write and read as files: one folder per run (checkpoints, log, export), the decoded-data
  cache and uploaded data sets. On a cluster it is a shared path (an NFS
  mount) that every node sees at the same place; the store records paths relative to it.
- The run store URL ($FINETUNE_LAB_DB, e.g. postgresql://user:pw@host/db) names a shared
  database; unset, the store is SQLite under the data directory.
- How long a worker rides through a store it cannot write ($FINETUNE_LAB_STORE_RETRY_S,
  seconds, default 300) before its run fails with the store's name and the cause.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from core.atomic import TEMP_PREFIX, TEMP_SUFFIX

DATA_DIR_ENV = "FINETUNE_LAB_DATA"
ARTIFACTS_ENV = "FINETUNE_LAB_ARTIFACTS"
DB_ENV = "FINETUNE_LAB_DB"
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / "runs"
STORE_RETRY_ENV = "FINETUNE_LAB_STORE_RETRY_S"
# Seconds a worker keeps retrying a store write (a PostgreSQL restart, a failover, a full
# disk being cleared) before it gives up: long enough for a restart or a failover.
DEFAULT_STORE_RETRY_S = 300.0


def data_dir() -> Path:
    """The data directory: $FINETUNE_LAB_DATA, else runs/ beside the code."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def artifact_root(data_directory: Path | None = None) -> Path:
    """The artifact root: $FINETUNE_LAB_ARTIFACTS, else the data directory."""
    env = os.environ.get(ARTIFACTS_ENV)
    if env:
        return Path(env)
    return data_directory if data_directory is not None else data_dir()


def store_url() -> str | None:
    """The run store's database URL from $FINETUNE_LAB_DB, or None (SQLite under the data
    directory)."""
    return os.environ.get(DB_ENV) or None


def store_retry_s() -> float:
    """How long (seconds) store writes are retried: $FINETUNE_LAB_STORE_RETRY_S, else
    DEFAULT_STORE_RETRY_S. A value that is not a number >= 0 is refused with its name."""
    text = os.environ.get(STORE_RETRY_ENV)
    if not text:
        return DEFAULT_STORE_RETRY_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise ValueError(f"{STORE_RETRY_ENV}={text!r}: give the seconds to retry a store "
                         f"write, a number >= 0 (default {DEFAULT_STORE_RETRY_S:.0f})")
    return value


@dataclass(frozen=True)
class RunFiles:
    """Every path in one run's folder."""

    folder: Path
    run_id: str

    # Temp files of atomic writes (core.atomic); exports are built in `.export-*` folders.
    # A killed worker may leave either behind.
    TEMP_GLOB = f"{TEMP_PREFIX}*{TEMP_SUFFIX}"
    EXPORT_BUILD_PREFIX = ".export-"

    @property
    def best(self) -> Path:
        """The best checkpoint by validation accuracy (what Classify and export use)."""
        return self.folder / "best.pt"

    @property
    def last(self) -> Path:
        """The last completed epoch, with optimizer/scheduler/RNG state: where a resume starts."""
        return self.folder / "last.pt"

    def stage_end(self, stage: int) -> Path:
        """The model at the end of `stage` (1-based), for before/after comparisons."""
        return self.folder / f"stage{stage}.pt"

    @property
    def log(self) -> Path:
        """The worker's stdout and stderr."""
        return self.folder / "worker.log"

    @property
    def job_request(self) -> Path:
        """What a tool's job (an LR finder's or an export's run) was asked to do, written by
        its `submit` as the run is created (core.analysis.lr_finder, core.analysis.export)."""
        return self.folder / "request.json"

    @property
    def job_result(self) -> Path:
        """What a tool's job made, beyond its metric rows (an export's files and notes)."""
        return self.folder / "result.json"

    @property
    def export_dir(self) -> Path:
        return self.folder / "export"

    @property
    def export_zip(self) -> Path:
        return self.folder / f"{self.run_id}-export.zip"

    def relative(self, path: str | os.PathLike[str]) -> str:
        """`path` as stored in the run record: relative to the run folder."""
        p = Path(path)
        return str(p.relative_to(self.folder)) if p.is_absolute() else str(p)

    def resolve(self, relative: str) -> Path:
        """A path stored in the run record, back to a path on this machine."""
        return self.folder / relative

    def temp_files(self) -> list[Path]:
        return sorted(self.folder.glob(self.TEMP_GLOB))


@dataclass(frozen=True)
class StoreLayout:
    """The folders of one store: the data directory `root` (the SQLite database) and the
    artifact root `artifacts` (default: `root`) with everything runs write as files."""

    root: Path
    artifacts: Path = field(default=None)  # type: ignore[assignment]  # None: root

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "artifacts",
                           Path(self.artifacts) if self.artifacts is not None else self.root)

    @classmethod
    def default(cls) -> StoreLayout:
        """The layout the environment names."""
        root = data_dir()
        return cls(root, artifact_root(root))

    @property
    def database(self) -> Path:
        """The SQLite run store (when no store URL is set)."""
        return self.root / "runs.sqlite3"

    @property
    def cache(self) -> Path:
        """Decoded data sets (core.engine.data), shared by every run."""
        return self.artifacts / "cache"

    @property
    def experiments(self) -> Path:
        """Where versions before store migration 10 kept one JSON record per experiment;
        the store imports them into its `experiments` table on first open."""
        return self.artifacts / "experiments"

    @property
    def datasets(self) -> Path:
        """Uploaded and unpacked data sets; the default data root."""
        return self.artifacts / "datasets"

    @property
    def supervisor_lock(self) -> Path:
        """Held by this machine's queue supervisor of the store (core.runs.supervisor)."""
        return self.root / "supervisor.lock"

    @property
    def supervisor_log(self) -> Path:
        return self.root / "supervisor.log"

    @property
    def cluster_health(self) -> Path:
        """Whether the Ray cluster was reachable at the last look, and since when
        (core.runs.executors.ray.ClusterHealth), written by whoever looked last."""
        return self.root / "ray-cluster.json"

    @property
    def search_drivers(self) -> Path:
        """Each search driver's lock and log (core.runs.search_driver), on this machine."""
        return self.root / "searches"

    def run(self, run_id: str) -> RunFiles:
        """One run's folder, under the artifact root."""
        return RunFiles(self.artifacts / run_id, run_id)

"""Where things live on disk: the one owner of every file and folder name.

`StoreLayout(root)` is the data directory (the run store's database, the decoded-data cache,
experiment records, uploaded data sets, one folder per run); `RunFiles` is one run's folder
(checkpoints, log, export). Nothing else in the code base spells these names: ask these
objects for the path. A later issue moves artifacts to a shared root; that change lands here.
No torch import here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core.atomic import TEMP_PREFIX, TEMP_SUFFIX

DATA_DIR_ENV = "FINETUNE_LAB_DATA"
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "runs"


def data_dir() -> Path:
    """The data directory: $FINETUNE_LAB_DATA, else runs/ beside the code."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


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
    """The data directory's layout."""

    root: Path

    @classmethod
    def default(cls) -> StoreLayout:
        return cls(data_dir())

    @property
    def database(self) -> Path:
        return self.root / "runs.sqlite3"

    @property
    def cache(self) -> Path:
        """Decoded data sets (core.engine.data), shared by every run."""
        return self.root / "cache"

    @property
    def experiments(self) -> Path:
        """One JSON record per experiment (core.analysis.experiments)."""
        return self.root / "experiments"

    @property
    def datasets(self) -> Path:
        """Uploaded and unpacked data sets; the default data root."""
        return self.root / "datasets"

    @property
    def supervisor_lock(self) -> Path:
        """Held by the store's one queue supervisor (core.runs.supervisor) while it runs."""
        return self.root / "supervisor.lock"

    @property
    def supervisor_log(self) -> Path:
        return self.root / "supervisor.log"

    def run(self, run_id: str) -> RunFiles:
        return RunFiles(self.root / run_id, run_id)

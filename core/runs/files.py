"""Where a run's files live: re-exported from core.settings, the one owner of every file and
folder name (it sits below the engine layer, which needs the same layout)."""

from __future__ import annotations

from core.settings import (
    ARTIFACTS_ENV,
    DATA_DIR_ENV,
    DB_ENV,
    DEFAULT_DATA_DIR,
    RunFiles,
    StoreLayout,
    artifact_root,
    data_dir,
)

__all__ = ["ARTIFACTS_ENV", "DATA_DIR_ENV", "DB_ENV", "DEFAULT_DATA_DIR", "RunFiles",
           "StoreLayout", "artifact_root", "data_dir"]

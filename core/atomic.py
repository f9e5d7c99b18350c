"""Atomic file writes: write a temp file in the same folder, fsync, then os.replace, so a
reader (or a crash) never sees a half-written file. The one implementation every module
uses. No torch import here."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# An atomic write's temp file is `.<name>.<random>.tmp` beside its target; core.settings
# derives the pattern that finds the ones a killed worker left behind from these.
TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"
FILE_MODE = 0o640  # what an atomically written file ends up with: owner writes, group reads


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call write(temp_path) for a temp file next to `path` (named `.<name>.*.tmp`, which
    core.runs.jobs cleans up after a killed worker), fsync it, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX,
                               dir=path.parent)
    os.close(fd)
    try:
        # mkstemp makes the file 0600; a dashboard or an export job running as another
        # user of the group (on a cluster, the shared artifact root) must read checkpoints.
        os.chmod(tmp, FILE_MODE)
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))

"""Atomic file writes: write a temp file in the same folder, fsync, then os.replace, so a
reader (or a crash) never sees a half-written file. The one implementation every module
uses. No torch import here."""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

# An atomic write's temp file is `.<name>.<random>.tmp` beside its target; core.settings
# derives the pattern that finds the ones a killed worker left behind from these.
TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"
FILE_MODE = 0o640  # what an atomically written file ends up with: owner writes, group reads
# Who writes a temp file or folder, in its name: this host (a hash of its name) and process,
# so a later start tells a killed writer's leftovers from a live writer's work in progress.
_WRITER_RE = re.compile(r"w([0-9a-f]{8})p(\d+)")
FOREIGN_LEFTOVER_S = 24 * 3600  # another host's temp untouched this long: its writer is gone


def _host_hash() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def writer_tag() -> str:
    """This process's tag for the temp names it writes ("w<host hash>p<pid>")."""
    return f"w{_host_hash()}p{os.getpid()}"


def left_by_dead_writer(path: Path) -> bool:
    """Whether temp file or folder `path` (named with a writer_tag) is a leftover: its writer
    was a process of this host that no longer runs, or of another host (a shared store)
    and untouched for FOREIGN_LEFTOVER_S. Untagged temps (older versions) count by age too.
    A live writer's temp is never a leftover."""
    from core.process import is_alive

    tags = _WRITER_RE.findall(path.name)  # the last one: a data-set name may look like a tag
    if tags and tags[-1][0] == _host_hash():
        return not is_alive(int(tags[-1][1]))
    try:
        return time.time() - path.stat().st_mtime > FOREIGN_LEFTOVER_S
    except OSError:
        return False


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call write(temp_path) for a temp file next to `path` (named `.<name>.*.tmp`, which
    core.runs.jobs cleans up after a killed worker), fsync it, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.{writer_tag()}.", suffix=TEMP_SUFFIX,
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

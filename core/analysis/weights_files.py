"""Weights files users bring (issue 20.2): an upload is stored under the first data root
(by default inside the data directory), checked like any weights file before a run may
start from it, and listed for picking afterwards, so nobody types an absolute path.

No streamlit here; no torch import until a file is checked.
"""

from __future__ import annotations

import re
from pathlib import Path

from core.atomic import atomic_write
from core.engine.paths import data_roots

WEIGHTS_FOLDER = "weights"  # under the first data root
SUFFIXES = (".pt", ".pth")
MAX_UPLOAD_BYTES = 500 * 1024**2  # a ResNet-18 state dict is about 45 MB


class WeightsRejected(ValueError):
    """An uploaded file that cannot start a run; the message says why in plain words."""


def weights_folder() -> Path:
    return data_roots()[0] / WEIGHTS_FOLDER


def stored_weights() -> list[Path]:
    """The weights files stored so far, newest first."""
    folder = weights_folder()
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file()
             and not p.name.startswith(".")]
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


def safe_name(name: str) -> str:
    """A file name from an uploaded file's name: its last part, letters, digits, '-', '_'
    and '.' only, with a weights suffix."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).name).strip(".-") or "weights"
    return stem if Path(stem).suffix.lower() in SUFFIXES else stem + ".pt"


def store_weights_upload(name: str, data: bytes) -> Path:
    """Store an uploaded weights file under weights_folder() (atomically; a file of the
    same name is replaced) after checking it holds ResNet-18 weights (loaded with
    weights_only=True: nothing in it runs). Raises WeightsRejected, storing nothing."""
    from core.runs.preflight import weights_file_problem

    if not data:
        raise WeightsRejected(f"{name} is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise WeightsRejected(f"{name} is {len(data) / 1024**2:.0f} MB; a ResNet-18 weights "
                              f"file is about 45 MB (at most {MAX_UPLOAD_BYTES // 1024**2} MB)")
    target = weights_folder() / safe_name(name)
    problems: list[str] = []

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
        if problem := weights_file_problem(tmp):  # checked before it takes the name
            problems.append(problem)
            raise WeightsRejected(f"{name} {problem}")

    atomic_write(target, write)
    return target

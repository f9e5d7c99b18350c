"""Disk use of runs: what each run keeps, what each file is for, and a clean-up that frees
what no feature needs any more. Paths come from core.settings.RunFiles (their one owner).
No torch, no streamlit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.runs.store import Run, RunStore
from core.settings import RunFiles

# Why a checkpoint is kept, in words for the run page.
PURPOSE_BEST = "the best model by validation accuracy: Classify, export and downloads use it"
PURPOSE_LAST = ("the last completed epoch with optimizer state: only a resume needs it "
                "(a finished run never resumes)")
PURPOSE_STAGE_END = "the model at the end of stage {stage}: Classify's “Before and after” uses it"


@dataclass(frozen=True)
class KeptFile:
    path: Path
    bytes: int
    purpose: str


@dataclass(frozen=True)
class RunDisk:
    total_bytes: int  # everything in the run's folder
    checkpoints: tuple[KeptFile, ...]  # the checkpoints present, with what each is for
    freeable_bytes: int  # what clean_up would delete (0 unless the run finished)


def file_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # gone meanwhile
        return 0


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under `folder` (0 when it does not exist)."""
    if not folder.is_dir():
        return 0
    return sum(file_bytes(p) for p in folder.rglob("*") if p.is_file())


def freeable(run: Run, files: RunFiles, stage_ends: bool = False) -> list[Path]:
    """Files a clean-up may delete: a finished run's last.pt (resume state) and, when asked,
    its stage-end checkpoints. best.pt always stays. Runs that may still resume (failed,
    cancelled) or are active keep everything."""
    if run.status != "finished":
        return []
    out = [files.last] if files.last.is_file() else []
    if stage_ends:
        out += [files.stage_end(s) for s in range(1, len(run.config.stages) + 1)
                if files.stage_end(s).is_file()]
    return out


def run_disk(run: Run, files: RunFiles) -> RunDisk:
    kept = []
    if files.best.is_file():
        kept.append(KeptFile(files.best, file_bytes(files.best), PURPOSE_BEST))
    if files.last.is_file():
        kept.append(KeptFile(files.last, file_bytes(files.last), PURPOSE_LAST))
    for s in range(1, len(run.config.stages) + 1):
        if files.stage_end(s).is_file():
            kept.append(KeptFile(files.stage_end(s), file_bytes(files.stage_end(s)),
                                 PURPOSE_STAGE_END.format(stage=s)))
    return RunDisk(folder_bytes(files.folder), tuple(kept),
                   sum(file_bytes(p) for p in freeable(run, files)))


def clean_up(store: RunStore, runs: Sequence[Run], stage_ends: bool = False) -> int:
    """Delete the freeable files of `runs` (see freeable); returns the bytes freed."""
    freed = 0
    for run in runs:
        for path in freeable(run, store.files(run.id), stage_ends):
            n = file_bytes(path)
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            freed += n
    return freed


def fmt_bytes(n: int) -> str:
    """Bytes as '512 B', '3.4 MB', '2.7 GB' (powers of 1000, as disks are sold)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"

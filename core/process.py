"""Processes and cores, through psutil: the one place that asks the operating system about a
process or the CPU, the same on Linux, macOS and Windows. No torch import here."""

from __future__ import annotations

import os

import psutil


def process_identity(pid: int) -> str | None:
    """A process's creation time (seconds since the epoch, as text): with the pid it names
    one process, so a reused pid is not mistaken for it. None when there is no such process."""
    try:
        return repr(psutil.Process(pid).create_time())
    except (psutil.Error, ValueError):
        return None


def is_alive(pid: int, identity: str | None = None) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped, does not) and, when
    `identity` is given, is the process that had it then."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return identity is None or repr(proc.create_time()) == identity
    except (psutil.Error, ValueError):
        return False


def physical_cores() -> int:
    """Physical cores this process may use (not hyper-threads): one torch thread per core is
    fastest for convolutions."""
    physical = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    try:
        usable = len(psutil.Process().cpu_affinity() or ())  # Linux and Windows
    except (AttributeError, psutil.Error):
        usable = os.cpu_count() or physical  # macOS: no affinity
    return max(1, min(physical, usable or physical))

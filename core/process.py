"""Processes and cores, through psutil: the one place that asks the operating system about a
process or the CPU, the same on Linux, macOS and Windows. No torch import here."""

from __future__ import annotations

import os

import psutil


def local_user() -> str:
    """The name of the user this process runs as (every OS), or "" when it has none (a
    container's uid without a passwd entry)."""
    try:
        return psutil.Process().username()
    except (psutil.Error, KeyError, OSError):
        return ""


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


# CPUs a cluster scheduler reserved for this process (a Ray job's entrypoint_num_cpus, set
# in the job's environment by core.runs.executors.ray): its threads stay within them, so
# jobs packed onto a node by their reservations do not oversubscribe its cores.
CPU_RESERVATION_ENV = "FINETUNE_LAB_CPUS"


def reserved_cpus() -> int | None:
    """The CPUs reserved for this process ($FINETUNE_LAB_CPUS, whole, at least 1), or None."""
    try:
        return max(1, int(float(os.environ[CPU_RESERVATION_ENV])))
    except (KeyError, ValueError):
        return None


def wait_gone(pid: int, identity: str | None, timeout_s: float) -> bool:
    """Wait up to `timeout_s` seconds for process `pid` (when still the one with `identity`)
    to end. Returns whether it has."""
    import time

    deadline = time.monotonic() + timeout_s
    while is_alive(pid, identity):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)  # a poll of the process table, not a wait for work
    return True


def physical_cores() -> int:
    """Physical cores this process may use (not hyper-threads; within a scheduler's
    reservation): one torch thread per core is fastest for convolutions."""
    physical = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    try:
        usable = len(psutil.Process().cpu_affinity() or ())  # Linux and Windows
    except (AttributeError, psutil.Error):
        usable = os.cpu_count() or physical  # macOS: no affinity
    return max(1, min(physical, usable or physical, reserved_cpus() or physical))

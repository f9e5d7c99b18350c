"""Executors: where a run's worker runs. `local` (the default: a detached process per run on
this machine, queued by FINETUNE_LAB_MAX_JOBS) or `ray` (a Ray job per run on the cluster at
RAY_ADDRESS, queued by the cluster's scheduler), chosen by FINETUNE_LAB_EXECUTOR.
No torch or ray import here."""

from __future__ import annotations

import os

from core.runs.executors.base import EXECUTOR_ENV, Executor
from core.runs.executors.local import LocalExecutor

EXECUTORS = ("local", "ray")


def executor_named(name: str | None) -> Executor:
    """The executor called `name` (a run's recorded executor; None: local)."""
    if name == "ray":
        from core.runs.executors.ray import RayExecutor

        return RayExecutor()
    if name in (None, "local"):
        return LocalExecutor()
    raise ValueError(f"{EXECUTOR_ENV} must be one of {', '.join(EXECUTORS)}, not {name!r}")


def current() -> Executor:
    """The executor new runs go to: $FINETUNE_LAB_EXECUTOR, else local."""
    return executor_named(os.environ.get(EXECUTOR_ENV) or "local")

"""Test-only fault injection: named points where a worker can be made to kill itself.

The worker calls `fault_point(name)` at every place where being killed must leave a
resumable run: before every training batch ("step"), after a checkpoint's temp file is
written but before it replaces the real file ("write:last.pt"), before the test pass and
before the outcome is recorded. Two environment variables drive it (both unset in normal
use, when a point costs one dict lookup):

- FINETUNE_LAB_FAULT_TRACE=FILE appends each point's name, one per line, as it is reached
  (a control run lists the points a run passes, in order);
- FINETUNE_LAB_KILL_AT=N sends SIGKILL to this process at the N-th point (1-based), the
  same death as `kill -9` or the out-of-memory killer.

tests/test_resume_exact.py kills a real worker at every point of a small run and checks
that the resumed run equals an uninterrupted one. No torch import here.
"""

from __future__ import annotations

import os
import signal

KILL_AT_ENV = "FINETUNE_LAB_KILL_AT"
TRACE_ENV = "FINETUNE_LAB_FAULT_TRACE"

_reached = 0  # points passed in this process


def fault_point(name: str) -> None:
    """A place where a kill must be survivable; see the module doc."""
    global _reached
    kill_at, trace = os.environ.get(KILL_AT_ENV), os.environ.get(TRACE_ENV)
    if not kill_at and not trace:
        return
    _reached += 1
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(name + "\n")
    if kill_at and _reached == int(kill_at):
        os.kill(os.getpid(), signal.SIGKILL)

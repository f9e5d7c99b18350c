"""Why a stage ended: the reason codes of the "stage_end" metric row the trainer logs at
the last epoch of every stage. No torch here: the charts read these codes.

Early-ended stages keep their nominal place on the global epoch axis (stage 2 still starts
after stage 1's epoch cap), so stage shading, stage attribution and "align at stage 2" read
the axis as before; the cut-short part of a stage simply has no rows.
"""

from __future__ import annotations

from enum import IntEnum

STAGE_END_KEY = "stage_end"


class StageEnd(IntEnum):
    NONE = 0  # the stage goes on (never logged)
    COMPLETED = 1  # all of the stage's epochs ran
    PLATEAU = 2  # validation accuracy stopped improving: the stage's plateau patience ran out
    EARLY_STOP = 3  # the run's early-stop patience ran out: this and every later stage end


STAGE_END_TEXTS: dict[StageEnd, str] = {
    StageEnd.COMPLETED: "all epochs ran",
    StageEnd.PLATEAU: "plateau: validation accuracy stopped improving",
    StageEnd.EARLY_STOP: "early stop: the run stopped improving",
}


def stage_end_text(code: float) -> str:
    """The reason of a logged stage_end value, in words ("" for an unknown code)."""
    try:
        return STAGE_END_TEXTS.get(StageEnd(int(code)), "")
    except ValueError:
        return ""

"""How every benchmark ends: its summary as one JSON object on the last line of stdout
(what scripts and the README read), and in a file with --json-out. No torch import."""

from __future__ import annotations

import json

from core.atomic import atomic_write_text


def emit_summary(summary: dict, json_out: str = "") -> str:
    """Print `summary` as the last line (sorted keys) and, if `json_out` names a file, write
    the same line there (atomically, its folder made). Returns the line."""
    line = json.dumps(summary, sort_keys=True)
    if json_out:
        atomic_write_text(json_out, line + "\n")
    print(line, flush=True)
    return line

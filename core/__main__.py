"""`python -m core`: the command line (core.cli)."""

import os
import sys

from core.cli import main


def run() -> int:
    """main(), ending quietly when the reader of our output goes away (`... | head -1`):
    what was asked for was printed, so that is success, not a traceback."""
    try:
        code = main()
        sys.stdout.flush()  # a pipe is block-buffered: the write, and its error, happen here
        return code
    except BrokenPipeError:
        # Point stdout at /dev/null so the interpreter's own flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(run())

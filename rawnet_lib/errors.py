"""The base of every error that is the user's input or environment, not a bug in the workbook.

Command-line entry points print such an error's message alone (it names the file, the line and
the fix); any other exception keeps its traceback, because that one is ours to fix.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, NoReturn

__all__ = ["WorkbookError", "run_cli"]


class WorkbookError(Exception):
    """Bad data, a bad parameter, a missing device or an existing run: the message says the fix."""


def run_cli(main: Callable[[], Any], interrupted: str = "interrupted") -> NoReturn:
    """Run a module's `main()` as a command (`if __name__ == "__main__": run_cli(main)`).

    A WorkbookError prints `error: <message>` to stderr and exits 2, without the traceback that
    would bury the fix; any other exception keeps its traceback. Ctrl-C prints `interrupted`
    and exits 130. An int returned by main is the exit status; anything else means success.
    """
    try:
        result = main()
    except WorkbookError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)


class MissingPathError(WorkbookError, FileNotFoundError):
    """A file or folder the user named (or the workbook needs from the user) is not there."""

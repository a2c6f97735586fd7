"""The base of every error that is the user's input or environment, not a bug in the workbook.

Command-line entry points print such an error's message alone (it names the file, the line and
the fix); any other exception keeps its traceback, because that one is ours to fix.
"""
from __future__ import annotations

__all__ = ["WorkbookError"]


class WorkbookError(Exception):
    """Bad data, a bad parameter, a missing device or an existing run: the message says the fix."""

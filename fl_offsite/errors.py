"""One exception type for mistakes a user can fix.

The CLI turns a ``UserError`` into a single ``error: ...`` line and exit code 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the field (or path) and how to fix it."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The most telling line of an exception from a library: its own first line, or else its
    cause's (``datasets`` wraps the real reason, e.g. the bad row, in ``__cause__``), or else
    its type (some have no message at all)."""
    for candidate in (exc.__cause__, exc) if _generic(exc) else (exc, exc.__cause__):
        if candidate is not None:
            lines = [line.strip() for line in str(candidate).splitlines() if line.strip()]
            if lines:
                return lines[0][:limit]
    return type(exc).__name__


def _generic(exc: BaseException) -> bool:
    return "An error occurred while generating the dataset" in str(exc)

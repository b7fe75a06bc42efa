"""One exception type for mistakes a user can fix.

The CLI turns a ``UserError`` into a single ``error: ...`` line and exit code 2; anything
else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the field (or path) and how to fix it."""

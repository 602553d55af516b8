"""The one exception type for mistakes a user can fix (bad orders, bad files, bad paths).

The CLI catches it once and prints it as a single line with exit code 2; anything else is a bug
and keeps its traceback.
"""


class AblationError(Exception):
    """A user-facing error: the message names the file, key or tensor at fault."""

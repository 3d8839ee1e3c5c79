"""The one exception type for errors a user can cause."""


class MemeditError(Exception):
    """A user-facing error: the message says what was wrong and what to do. The CLI prints it in one line
    and exits with code 2."""

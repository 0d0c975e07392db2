"""One error type for bad user input: scripts print its message on one line and exit non-zero."""


class MemtrainError(Exception):
    """A user-facing error whose message names the bad input and what to do."""

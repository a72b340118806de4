"""The one exception type for user mistakes: the CLI prints its message on one line and exits non-zero."""


class EdgekdError(Exception):
    """A problem the user can fix (bad input, missing data, offline weights). The message says what to do."""

"""The one exception type for user mistakes: the CLI prints its message on one line and exits non-zero."""


class EdgekdError(Exception):
    """A problem the user can fix (bad input, missing data, offline weights). The message says what to do."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's first message line, cut to `limit` characters, for a one-line error; its type name when the
    message is empty (timm's bare `assert`s have none, and `str(error).splitlines()[0]` raises IndexError there)."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__

"""The one exception type for bad user input, and the warning for input that runs but misleads.

The CLI turns a `SaelabError` into a one-line message and exit code 2; anything else is a bug
and keeps its traceback. A `SaelabWarning` it prints as one line and carries on.
"""


class SaelabError(ValueError):
    """Bad input: the message names what is wrong and what would be right."""


class SaelabWarning(UserWarning):
    """Input that runs but whose result would mislead: the message says what and why."""


def first_line(e: BaseException) -> str:
    """The first line of a library's exception message (its type name if empty), for a one-line
    error that says why without the library's multi-line advice."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]

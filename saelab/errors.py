"""The one exception type for bad user input.

The CLI turns a `SaelabError` into a one-line message and exit code 2; anything else is a bug
and keeps its traceback.
"""


class SaelabError(ValueError):
    """Bad input: the message names what is wrong and what would be right."""

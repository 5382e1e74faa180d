"""The base of every error cna-local reports to a user.

Each module defines its own subclass next to the code that raises it. Every
message names the problem and the fix, so the CLI can print it as it is.
"""


class CnaLocalError(ValueError):
    """Bad input to cna-local: the message says what is wrong and how to fix it."""

"""Errors that are the user's to fix: a config key, a data file and its line, a checkpoint path, the workdir.

`launch/main.py` prints a `UserError` as one line (no traceback) and exits with status 2; anything else is a bug
in the program and keeps its traceback. It subclasses ValueError so callers that already catch bad values still do.
"""


class UserError(ValueError):
    """Bad input. The message names the thing (key, file:line, path) and says what would work."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the config names does not exist (also a FileNotFoundError, for callers that catch that)."""

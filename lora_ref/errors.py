"""Exceptions shared by the library and the command line."""


class UsageError(ValueError):
    """A command-line flag value that is not allowed: the CLI exits with status 2 (bad usage)."""

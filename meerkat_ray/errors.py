"""Exceptions the CLI turns into one `error: ...` line and exit status 2."""


class MeerkatError(Exception):
    """Bad input: a config key, a path, a file. The message names what is wrong."""


class ConfigError(MeerkatError, ValueError):
    """A config key has an unknown name, a wrong type or an out-of-range value."""

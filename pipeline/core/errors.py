"""Error types. Every message is one line: what happened, which file or field, and what to do.

Only the CLI turns these into a printed line and a non-zero exit code.
"""

from __future__ import annotations


class LogitcacheError(Exception):
    """Base class for errors a user can fix."""


class ConfigError(LogitcacheError):
    """A config key is unknown, has the wrong type, or an invalid value."""


class DataError(LogitcacheError):
    """An input data file is missing or malformed."""


class ModelError(LogitcacheError):
    """A teacher or student model cannot be built, loaded, or gives unusable outputs."""


class CacheError(LogitcacheError):
    """A cache is missing, incomplete, corrupt, or does not match the data or model."""



class ArgumentError(ConfigError, ValueError):
    """An argument of the Python API breaks the rule its config field follows (pipeline/core/validate.py);
    a ValueError too, as Python code expects of a bad argument."""

"""The trainer's errors that a user's files or flags cause; ``espro`` prints them as one line.

They are :class:`~serving.errors.EsproError` s. They live apart from the modules that raise
most of them, which import torch, so that the command line raises them without importing torch
(``espro serve`` starts Ray while torch loads).
"""

from serving.errors import EsproError


class ConfigError(EsproError, ValueError):
    """A configuration that cannot be read or validated; the message names the field."""


class DataError(EsproError, ValueError):
    """A data set that cannot be read as configured; the message says what to set."""


class CheckpointError(EsproError, ValueError):
    """A work directory that belongs to another configuration."""

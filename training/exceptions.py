"""The trainer's errors that a user's files or flags cause; ``espro`` prints them as one line.

They live apart from the modules that raise them, which import torch, so that the command line
can catch them without importing torch first (``espro serve`` starts Ray while torch loads).
"""


class ConfigError(ValueError):
    """A configuration that cannot be read or validated; the message names the field."""


class DataError(ValueError):
    """A data set that cannot be read as configured; the message says what to set."""


class CheckpointError(ValueError):
    """A work directory that belongs to another configuration."""

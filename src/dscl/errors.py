"""The project's own error types.

Everything a user can get wrong (a path, a config key, a corrupt image, a checkpoint from
another run) raises a subclass of :class:`DSCLError` with a message that names the file,
line or key. The command-line entry point prints these without a traceback.
"""


class DSCLError(Exception):
    """Base class of every error the project raises on purpose."""


class ConfigError(DSCLError):
    """A recipe or an override is malformed: unknown key, wrong type, value out of range."""


class DataError(DSCLError):
    """A data set cannot be read: missing path, malformed split file, corrupt image, bad label."""


class CheckpointError(DSCLError):
    """A checkpoint is unreadable, truncated, or belongs to a different run."""


class NumericalError(DSCLError):
    """A loss became NaN or infinite."""


class ArgumentError(DSCLError):
    """A command-line argument does not fit what it refers to: a box outside the image, an
    image index past the end of its split."""

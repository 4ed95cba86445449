"""Errors that are the user's to fix. The command-line entry points print their message as one
line and exit with status 2, without a traceback; anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """A mistake in a config value, a path, a checkpoint or data the user supplied."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    pass


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass


class DeployError(UserError):
    """Export to ONNX and running an exported file: a missing extra, an unwritable path, a file
    that does not fit the data."""


class WriteError(UserError):
    """A file of the run could not be written (a full disk, a read-only folder); what was there
    before is intact."""

"""Errors that are the user's to fix: the CLI prints their message as one line, no traceback.

Every message names the field or file at fault and says how to fix it. Library modules raise
plain ``ValueError`` (and ``data.DataError``); the engine turns what a user caused into these.
"""


class UserError(Exception):
    """A mistake in the config, the data or the workdir; nothing already written was changed."""


class ConfigError(UserError, ValueError):
    """A config field has a bad value; the message names the field and the allowed values."""


class WorkdirError(UserError):
    """The workdir cannot be used as asked (another run, not a workdir, held by a process)."""


class CorruptFileError(UserError):
    """A file of the workdir cannot be read; the message names it."""


class DivergedError(UserError):
    """Training produced a non-finite loss; the last good checkpoint is kept."""


class DiskError(UserError):
    """A write failed for lack of space or permission; the message names the path."""


class LaunchError(UserError):
    """The processes of a multi-process run cannot find each other (address, count, id)."""


class ProcessError(UserError):
    """Another process of a multi-process run stopped with an error (its log has the details)."""

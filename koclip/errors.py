"""Exceptions that koclip raises for bad input.

Every error a user can cause (a missing file, a corrupt checkpoint, a broken
image, a refused URL) is a subclass of `KoclipError`, so the app and the CLI
can show its message and keep going.  Messages name the bad value and say what
would be valid.
"""


class KoclipError(Exception):
    """Base class for errors caused by input rather than by a bug."""


class UnknownModelError(KoclipError, KeyError):
    """A model name that is not in the registry, a local directory or the hub."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(KoclipError):
    """A configuration value that is not valid: an unknown kind or name, sizes that do not fit,
    a training config file or override.  Where the value was read from a checkpoint's
    config.json, the reader raises CheckpointError naming the file instead."""


class CheckpointError(KoclipError):
    """A checkpoint file that is missing, corrupt, truncated or does not fit its config."""


class OfflineError(KoclipError):
    """The weights are not cached and the hub cannot be reached."""


class ImageError(KoclipError):
    """An image that cannot be read: not an image, corrupt, too large."""


class FetchError(KoclipError):
    """A URL that was refused or could not be fetched."""


class IndexFileError(KoclipError):
    """An embedding index that is corrupt or was built with another model."""

"""User-facing errors: one line that says what is wrong and what to do about it."""

from __future__ import annotations


class VpgtransError(Exception):
    """An error caused by the user's input or environment; the CLI prints it as one line."""

    exit_code = 2

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(what if not fix else f"{what} — {fix}")


class ConfigError(VpgtransError):
    """A recipe, component config or command-line override is invalid."""


class RegistryError(VpgtransError):
    """A component name is unknown or registered twice."""


class WeightsNotFoundError(VpgtransError):
    """Model weights are not on disk and cannot be downloaded here."""


class DataError(VpgtransError):
    """A data file or image is missing, unreadable or malformed."""


class CheckpointError(VpgtransError):
    """A checkpoint is missing, incomplete, unsafe or made for another model."""


class TrainingError(VpgtransError):
    """Training cannot go on (non-finite loss, out of resources)."""

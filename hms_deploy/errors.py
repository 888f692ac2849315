"""Typed errors. The CLI turns any :class:`HMSError` into one line on stderr and exit 1
(exit 2 for :class:`ConfigError`, a usage error)."""

from __future__ import annotations


class HMSError(Exception):
    """Base of every error the library raises on bad input or a missing capability."""


class ConfigError(HMSError):
    """An unknown variant, an inconsistent option or a labels file that does not fit."""


class CheckpointError(HMSError):
    """A checkpoint that is missing, corrupt, holds pickled objects or has the wrong keys."""


class WeightsError(HMSError):
    """A pretrained weights file that does not fit the backbone it was given for."""


class VideoError(HMSError):
    """A video that cannot be opened or decoded; the message names the file and the reason."""


class ExportError(HMSError):
    """An export that failed (a part, a check, a parity figure) or an export dir that is invalid."""


class ManifestError(ExportError):
    """A manifest that is missing, malformed, or whose files do not match their hashes."""


class EngineError(HMSError):
    """An engine that received wrong inputs or could not be built or loaded."""


class BackendUnavailable(EngineError):
    """A backend whose package or device is missing; the message says what to install."""


class DatasetError(HMSError):
    """A dataset list or feature store that is malformed."""

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


def first_line(e: BaseException, *, typed: bool | None = None, limit: int = 300) -> str:
    """``e`` as one line for a message: the first non-empty line of ``str(e)``, whitespace
    collapsed, at most ``limit`` characters.

    ``typed``: prefix the exception's type name (``"ValueError: ..."``); by default only
    for errors that are not an :class:`HMSError` (ours are written to be read as they
    are). An exception without a message gives its type name.
    """
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    text = " ".join(lines[0].split()) if lines else ""
    if typed is None:
        typed = not isinstance(e, HMSError)
    if not text:
        return type(e).__name__
    return (f"{type(e).__name__}: {text}" if typed else text)[:limit]

"""Typed errors with fields. Below ``cli/`` no message names a command-line flag: an error
about a setting says which one (``setting``, the library's name: a keyword of the API,
a field of :class:`~hms_deploy.runtime.options.RunSettings`), the ``value`` it got and
what was ``expected``, and a step that fixes it (``remedy``, worded as a library call); the
CLI turns those into flag advice, command lines and an exit code
(:func:`hms_deploy.cli.common.flag_advice`). A warning that names settings is a
:class:`Note`: a str that knows which settings it names, for the same advice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

# what each remedy step is in the library (the CLI has a command line for each)
REMEDY_CALLS = {
    "trt_plans": "hms_deploy.export.add_trt_plans({path!r})",  # build an export's TensorRT plans
}


@dataclass(frozen=True)
class Remedy:
    """A step that fixes an error: ``step`` (a key of :data:`REMEDY_CALLS`) on ``path``.
    Messages show it as :attr:`text`, the library call."""

    step: str
    path: str

    @property
    def text(self) -> str:
        return REMEDY_CALLS[self.step].format(path=self.path)


class Note(str):
    """A one-line warning (a str) that names ``settings`` by their library names. Where a
    note is kept in a checkpoint it is kept as ``str(note)`` (checkpoints hold builtins only,
    for ``torch.load(weights_only=True)``)."""

    settings: tuple[str, ...]

    def __new__(cls, text: str, *, settings: tuple[str, ...]) -> Self:
        note = super().__new__(cls, text)
        note.settings = tuple(settings)
        return note


class HMSError(Exception):
    """Base of every error the library raises on bad input or a missing capability.

    ``setting``: the setting (or settings, a tuple) the error is about, by their library
    names; ``value``: what it was given; ``expected``: what it takes (one phrase);
    ``remedy``: a :class:`Remedy` the message shows as its :attr:`~Remedy.text`.
    """

    def __init__(self, message: str = "", *, setting: str | tuple[str, ...] | None = None,
                 value: Any = None, expected: str | None = None,
                 remedy: Remedy | None = None):
        super().__init__(message)
        self.setting = setting
        self.value = value
        self.expected = expected
        self.remedy = remedy

    @property
    def settings(self) -> tuple[str, ...]:
        """``setting`` as a tuple (empty when the error is about no setting)."""
        if self.setting is None:
            return ()
        return (self.setting,) if isinstance(self.setting, str) else tuple(self.setting)


class ConfigError(HMSError):
    """An unknown variant, an inconsistent option or a labels file that does not fit."""


def require_at_least(name: str, value: float | None, low: float, *, strict: bool = False) -> None:
    """The one wording of a setting's lower bound: a :class:`ConfigError` naming setting
    ``name`` unless ``value`` >= ``low`` (> with ``strict``); None (not given) passes."""
    if value is None or (value > low if strict else value >= low):
        return
    bound = f"{'>' if strict else '>='} {low:g}"
    raise ConfigError(f"{name} must be {bound}, got {value}", setting=name, value=value,
                      expected=bound)


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

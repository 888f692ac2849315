"""The one options object of a run: :class:`RunSettings` (steps T, policy, budget, online,
top-k, no-audio policy, truncated files, batching, decoding).

Every setting is declared here once, with its default and its check; the CLI builds a
``RunSettings`` from its flags (its options carry the field names), and
:class:`~hms_deploy.runtime.session.Session`, the Ray actor pool, the Triton model and the
benchmarks take one. Checks that need no model run when the object is made
(:class:`~hms_deploy.errors.ConfigError` naming the field in ``setting``); :meth:`for_model`
fills ``steps`` with the model's T and checks that the budget affords one step. The
resume key of ``hms-run --output`` (:meth:`RunSettings.resume_key`) is derived from the
fields marked as changing a record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, cast

import numpy as np

from hms_deploy.costs import BudgetLedger, step_costs
from hms_deploy.errors import ConfigError
from hms_deploy.runtime.checks import parse_no_audio_policy
from hms_deploy.runtime.engines import EngineSet
from hms_deploy.runtime.frames import DecodeOptions
from hms_deploy.runtime.policy import Policy, parse_policy

DEFAULT_APPEARANCE_BATCH = 8  # measured: benchmarks/results/appearance_batch_cpu_paper_onnx.md

KEY = "key"  # field metadata: the name under which the field enters the resume key


def int_at_least(name: str, value: Any, low: int, what: str = "an integer ") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{name} must be {what}>= {low}, got {value!r}", setting=name,
                          value=value, expected=f"an integer >= {low}")
    return int(value)


@dataclass(frozen=True)
class RunSettings:
    """The settings of a run, checked when made (see the module docstring).

    ``policy`` =
    ``learned | dense | audio-only | dense-appearance | every:KI[,KM] | rates:PI,PM[,SEED]``
    (:mod:`hms_deploy.runtime.policy`); ``budget`` in GMAC per video (> 0; it must afford
    one step of the model); ``steps`` = T (None: the model's, filled by :meth:`for_model`);
    ``online`` runs the head after every step (partial records);
    ``topk`` (label, probability) pairs per record; ``no_audio_policy``: what a video
    without audio runs when the gates would decide (a policy, or ``"error"`` to refuse
    such videos; :mod:`hms_deploy.runtime.checks`; default ``dense-appearance``);
    ``allow_truncated`` classifies the decodable part of a truncated file;
    ``batch_size`` videos stepped in lockstep; ``appearance_batch`` appearance frames per
    backbone call where plans are known in advance
    (:mod:`hms_deploy.runtime.appearance_ahead`; 1 = one step at a time);
    ``audio_batch`` audio patches per audio backbone call; ``decode``: how inputs decode
    (the same frames either way).
    """

    policy: Policy | str = field(default="learned", metadata={KEY: "policy"})
    budget: float | None = field(default=None, metadata={KEY: "budget"})
    steps: int | None = field(default=None, metadata={KEY: "T"})
    online: bool = False
    topk: int = field(default=5, metadata={KEY: "topk"})
    no_audio_policy: Policy | str | None = field(default=None, metadata={KEY: "no_audio_policy"})
    allow_truncated: bool = field(default=False, metadata={KEY: "allow_truncated"})
    batch_size: int = 1
    appearance_batch: int = DEFAULT_APPEARANCE_BATCH
    audio_batch: int = 64
    decode: DecodeOptions = field(default_factory=DecodeOptions)

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.steps is not None:
            put("steps", int_at_least("steps", self.steps, 1))
        put("policy", parse_policy(self.policy))
        no_audio = parse_no_audio_policy(self.no_audio_policy)
        put("no_audio_policy", "error" if no_audio is None else no_audio)
        if self.budget is not None:
            b = self.budget
            try:
                b = float(b)
            except (TypeError, ValueError):
                raise ConfigError(f"budget must be a number of GMAC > 0, got {b!r}",
                                  setting="budget", value=b, expected="a number > 0") from None
            if not b > 0 or not math.isfinite(b):
                raise ConfigError(f"budget must be a number of GMAC > 0, got {b:g}",
                                  setting="budget", value=b, expected="a number > 0")
            put("budget", b)
        put("online", bool(self.online))
        put("allow_truncated", bool(self.allow_truncated))
        put("topk", int_at_least("topk", self.topk, 1))
        put("batch_size", int_at_least("batch_size", self.batch_size, 1, ""))
        put("appearance_batch", int_at_least("appearance_batch", self.appearance_batch, 1))
        put("audio_batch", int_at_least("audio_batch", self.audio_batch, 1))

    # -- derived -------------------------------------------------------------------------
    @property
    def parsed_policy(self) -> Policy:
        """``policy`` as a :class:`Policy` (a string given is parsed at construction)."""
        return cast(Policy, self.policy)

    @property
    def no_audio(self) -> Policy | None:
        """The parsed no-audio policy; None refuses videos without audio."""
        p = self.no_audio_policy
        return p if isinstance(p, Policy) else None

    @property
    def T(self) -> int:
        """``steps`` once filled (:meth:`for_model`)."""
        if self.steps is None:
            raise ConfigError("steps are not known before the model is", setting="steps")
        return self.steps

    def for_model(self, engine_set: EngineSet) -> RunSettings:
        """These settings for a model: ``steps`` filled with its T, and the budget checked
        to afford one step (its base cost plus the head)."""
        out = self if self.steps is not None else replace(self, steps=engine_set.config.steps)
        if out.budget is not None:
            s = step_costs(engine_set.costs)
            first = s["base"] + s["head"]
            if out.budget < first * (1 - BudgetLedger.EPS):
                raise ConfigError(
                    f"budget {out.budget:g} GMAC cannot afford one step (base {s['base']:.4g} "
                    f"GMAC + head {s['head']:.4g} GMAC = {first:.4g} GMAC)",
                    setting="budget", value=out.budget, expected=f"at least {first:.4g} GMAC")
        return out

    def with_overrides(self, **overrides: Any) -> RunSettings:
        """A copy with ``overrides`` (field names; :class:`ConfigError` for an unknown one)."""
        unknown = sorted(set(overrides) - FIELD_NAMES)
        if unknown:
            raise ConfigError(f"unknown run setting(s) {', '.join(unknown)}; expected one of "
                              f"{', '.join(sorted(FIELD_NAMES))}", setting=tuple(unknown))
        return replace(self, **overrides) if overrides else self

    def require_whole_videos(self) -> None:
        """Refuse settings that need the driver to see steps (Ray actors run whole videos)."""
        bad = tuple(n for n, on in (("online", self.online), ("batch_size", self.batch_size > 1))
                    if on)
        if bad:
            raise ConfigError(f"{bad[0]} does not apply to a run on a Ray actor pool, which "
                              "classifies whole videos on each worker", setting=bad)

    def resume_key(self) -> dict[str, Any]:
        """The settings that change a final record (``online``, batching and decoding do
        not), as JSON values, for :func:`hms_deploy.runtime.results.run_settings`."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if KEY in f.metadata:
                v = getattr(self, f.name)
                out[f.metadata[KEY]] = v if v is None or isinstance(v, (bool, int, float)) else str(v)
        return out


FIELD_NAMES = frozenset(f.name for f in fields(RunSettings))


def settings_from(settings: RunSettings | None = None, **overrides: Any) -> RunSettings:
    """``settings`` (default: the defaults) with ``overrides`` (keyword API of the Session)."""
    return (settings or RunSettings()).with_overrides(**overrides)


def resolve_options(engine_set: EngineSet, settings: RunSettings | None = None,
                    **overrides: Any) -> RunSettings:
    """:func:`settings_from` checked against ``engine_set`` (:meth:`RunSettings.for_model`)."""
    return settings_from(settings, **overrides).for_model(engine_set)

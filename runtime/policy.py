"""Who decides which modalities run at each step: the learned gates or a forced policy.

Policy strings (``hms-run --policy``, ``Session.classify(policy=...)``):

- ``learned`` (default): the exported gates decide (docs/method.md §3).
- ``dense``: appearance and motion on every step.
- ``audio-only``: never appearance, never motion.
- ``dense-appearance``: appearance on every step, motion by its learned gate (the
  default no-audio policy, :mod:`hms_deploy.runtime.checks`; docs/method.md §9).
- ``every:KI[,KM]``: appearance where ``t % KI == 0``; motion where ``t % KM == 0`` and
  appearance ran (KM defaults to KI). ``every:1`` is ``dense``.
- ``rates:PI,PM[,SEED]``: seeded pseudo-random decisions: exactly ``round(PI * T)``
  appearance steps drawn uniformly among the T steps, and exactly ``round(PM * T)``
  motion steps drawn among those appearance steps (so motion runs on a fraction PM of
  *all* steps and the hierarchy holds); ``0 <= PM <= PI <= 1``; SEED (default 0) is a
  non-negative integer. The same (PI, PM, SEED, T) always gives the same plan, on every
  machine (numpy's PCG64).

Forced policies (all but ``learned`` and ``dense-appearance``) never call the gate engines (no gate launch, no host read); a budget
(:mod:`hms_deploy.runtime.scheduler`) may still veto what they ask for. Plans are per
step and shared by every video of a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from hms_deploy.errors import ConfigError

POLICY_HELP = (
    "learned | dense | audio-only | dense-appearance | every:KI[,KM] | rates:PI,PM[,SEED]"
)
GATE = -1  # in a tier plan: "the learned gate decides this step"


@dataclass(frozen=True)
class Policy:
    """A parsed policy. ``kind``: learned, dense, audio-only, dense-appearance, every, rates."""

    kind: str
    every_appearance: int = 1
    every_motion: int = 1
    rate_appearance: float = 0.0
    rate_motion: float = 0.0
    seed: int = 0

    @property
    def forced(self) -> bool:
        """True when the gates are not consulted."""
        return self.kind not in ("learned", "dense-appearance")

    def tier_plans(self, steps: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """(appearance, motion) int64 (T,): 0/1 forced decisions, or :data:`GATE` where a
        learned gate decides (every policy, ``learned`` included)."""
        if self.kind == "learned":
            g = np.full(steps, GATE, np.int64)
            return g, g.copy()
        if self.kind == "dense-appearance":
            return np.ones(steps, np.int64), np.full(steps, GATE, np.int64)
        return self.plan(steps)

    def __str__(self) -> str:
        """The canonical string (what the result records as ``policy``)."""
        if self.kind == "every":
            if self.every_motion == self.every_appearance:
                return f"every:{self.every_appearance}"
            return f"every:{self.every_appearance},{self.every_motion}"
        if self.kind == "rates":
            s = f"rates:{self.rate_appearance:g},{self.rate_motion:g}"
            return s + (f",{self.seed}" if self.seed else "")
        return self.kind

    def plan(self, steps: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Decisions of a forced policy for ``steps`` steps: (appearance, motion) int64 (T,) 0/1.

        Motion is 1 only where appearance is 1. Raises :class:`ConfigError` for ``learned``.
        """
        t = np.arange(steps)
        if not self.forced:
            raise ConfigError(f"the {self.kind} policy has no fixed plan; its gates decide")
        if self.kind == "dense":
            a = np.ones(steps, np.int64)
            return a, a.copy()
        if self.kind == "audio-only":
            z = np.zeros(steps, np.int64)
            return z, z.copy()
        if self.kind == "every":
            a = (t % self.every_appearance == 0).astype(np.int64)
            m = ((t % self.every_motion == 0) & (a == 1)).astype(np.int64)
            return a, m
        # rates: exactly round(PI T) appearance steps, round(PM T) motion steps among them
        rng = np.random.Generator(np.random.PCG64(self.seed))
        n_a = min(steps, _round_half_up(self.rate_appearance * steps))
        n_m = min(n_a, _round_half_up(self.rate_motion * steps))
        a_steps = rng.choice(steps, size=n_a, replace=False)
        m_steps = rng.choice(a_steps, size=n_m, replace=False) if n_m else a_steps[:0]
        a = np.zeros(steps, np.int64)
        m = np.zeros(steps, np.int64)
        a[a_steps] = 1
        m[m_steps] = 1
        return a, m


def _round_half_up(x: float) -> int:
    """round() without banker's rounding, so rates:0.5 of 5 steps is 3, not 2."""
    return math.floor(x + 0.5 + 1e-9)


def _positive_int(text: str, what: str, policy: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise ConfigError(
            f"policy {policy!r}: {what} must be an integer >= 1, got {text!r}"
        ) from None
    if v < 1:
        raise ConfigError(f"policy {policy!r}: {what} must be an integer >= 1, got {v}")
    return v


def _fraction(text: str, what: str, policy: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ConfigError(
            f"policy {policy!r}: {what} must be a number in [0, 1], got {text!r}"
        ) from None
    if not 0.0 <= v <= 1.0:  # also rejects nan
        raise ConfigError(f"policy {policy!r}: {what} must be a number in [0, 1], got {text}")
    return v


def parse_policy(text: str | Policy) -> Policy:
    """Parse a policy string (see the module docstring); :class:`ConfigError` if malformed."""
    if isinstance(text, Policy):
        return text
    if not isinstance(text, str):
        raise ConfigError(f"policy must be a string ({POLICY_HELP}), got {type(text).__name__}")
    s = text.strip().lower()
    if s in ("learned", "dense", "audio-only", "dense-appearance"):
        return Policy(s)
    name, sep, args = s.partition(":")
    parts = [p.strip() for p in args.split(",")] if sep else []
    if name == "every":
        if not 1 <= len(parts) <= 2 or not all(parts):
            raise ConfigError(f"policy {text!r}: expected every:KI or every:KI,KM (e.g. every:4)")
        ki = _positive_int(parts[0], "KI", text)
        km = _positive_int(parts[1], "KM", text) if len(parts) == 2 else ki
        return Policy("every", every_appearance=ki, every_motion=km)
    if name == "rates":
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise ConfigError(
                f"policy {text!r}: expected rates:PI,PM or rates:PI,PM,SEED (e.g. rates:0.6,0.05)"
            )
        pi = _fraction(parts[0], "PI", text)
        pm = _fraction(parts[1], "PM", text)
        if pm > pi:
            raise ConfigError(
                f"policy {text!r}: PM ({pm:g}) must be <= PI ({pi:g}); motion runs only "
                "where appearance ran"
            )
        seed = 0
        if len(parts) == 3:
            try:
                seed = int(parts[2])
            except ValueError:
                seed = -1
            if seed < 0:
                raise ConfigError(
                    f"policy {text!r}: SEED must be an integer >= 0, got {parts[2]!r}"
                )
        return Policy("rates", rate_appearance=pi, rate_motion=pm, seed=seed)
    raise ConfigError(f"unknown policy {text!r}, expected {POLICY_HELP}")

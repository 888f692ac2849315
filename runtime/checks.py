"""Per-video input checks and the no-audio fallback (docs/method.md §9), for the scheduler.

**No audio track.** The gates read the audio LSTM's state; without audio it never
changes, so the learned gates would give one fixed answer for every silent video. A
video whose audio decodes to nothing (no audio stream, or one without a decodable
frame) is therefore run under the *no-audio policy* whenever the run's policy consults
a gate (``learned``, ``dense-appearance``); a forced policy consults none and runs as
asked. The default no-audio policy is ``dense-appearance`` (appearance on every step,
motion by its learned gate; the audio path sees silence); ``--no-audio-policy`` /
``no_audio_policy=`` takes any policy, or ``error`` to refuse such videos (under every
policy). The record then says ``"fallback": "no_audio"`` and carries a warning. A track
of digital silence is audio: it runs under the run's policy, with no fallback.

**Checks** (:mod:`hms_deploy.data.checks`): not a video and truncated files raise
:class:`~hms_deploy.errors.VideoError` before any audio is decoded; steps that
outnumber distinct frames or audio patches add a warning.

Decisions are planned per video and per tier as (T,) int64 arrays: 0/1 forced, or
:data:`~hms_deploy.runtime.policy.GATE` where the learned gate decides, so one lockstep
batch can mix videos with and without audio.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from hms_deploy.data.checks import check_truncation, distinct_input_warnings, require_video
from hms_deploy.data.inputs import VideoInputs
from hms_deploy.data.video import ProbedVideo, probe_open
from hms_deploy.errors import ConfigError, VideoError
from hms_deploy.runtime.policy import Policy, parse_policy

DEFAULT_NO_AUDIO_POLICY = "dense-appearance"


def parse_no_audio_policy(text: str | Policy | None) -> Policy | None:
    """``None`` for ``error``; else the parsed policy (default ``dense-appearance``)."""
    if text is None:
        text = DEFAULT_NO_AUDIO_POLICY
    if isinstance(text, str) and text.strip().lower() == "error":
        return None
    try:
        return parse_policy(text)
    except ConfigError as e:
        raise ConfigError(f"no-audio policy: {e} or 'error'") from None


@dataclass
class VideoPlan:
    """What one video of a batch runs under, and what its record says about it."""

    appearance: NDArray[np.int64]  # (T,): 0/1 forced or GATE
    motion: NDArray[np.int64]
    fallback: str | None = None
    warnings: list[str] = field(default_factory=list)


def probe_checked(path: str, *, allow_truncated: bool) -> tuple[ProbedVideo, list[str]]:
    """Probe and check a video (not a video, truncated); (probe, warnings) or :class:`VideoError`.

    The probe keeps its container open for the frame reader
    (:func:`~hms_deploy.runtime.frames.open_video` takes it as ``info``). With
    ``allow_truncated`` a truncated file's info is cut to its decodable part.
    """
    probed = probe_open(path)
    container = probed.take()
    try:
        require_video(probed.info)
        info, warnings = check_truncation(probed.info, allow_truncated=allow_truncated,
                                          container=container)
    except BaseException:
        container.close()
        raise
    return ProbedVideo(info, container), warnings


def plan_before_audio(policy: Policy, steps: int) -> tuple[NDArray[np.int64], NDArray[np.int64]] | None:
    """The plan :func:`plan_video` will return, where it is known before the audio is
    decoded (a forced policy: the same decisions with or without audio), else None."""
    return policy.tier_plans(steps) if policy.forced else None


def plan_video(
    inputs: VideoInputs, policy: Policy, no_audio: Policy | None, steps: int
) -> VideoPlan:
    """The decisions plan of one video after its audio was decoded (``inputs.has_audio`` set)."""
    sampler = inputs.sampler
    has_audio = bool(inputs.has_audio)
    warnings = distinct_input_warnings(
        steps, sampler.appearance_indices, sampler.centers, sampler.front_end,
        sampler.info.duration_s, has_audio=has_audio,
    )
    if has_audio:
        a, m = policy.tier_plans(steps)
        return VideoPlan(a, m, warnings=warnings)
    if no_audio is None:
        raise VideoError(f"{inputs.path}: no audio track (refused by no_audio_policy error)",
                         setting="no_audio_policy", value="error")
    if policy.forced or no_audio == policy:
        why = "needs no gate" if policy.forced else "is also the no-audio policy"
        warnings.append(f"no audio track: the audio path sees silence (policy {policy} {why})")
        a, m = policy.tier_plans(steps)
        return VideoPlan(a, m, warnings=warnings)
    warnings.append(
        f"no audio track: the learned gates need audio; ran the no-audio policy {no_audio} "
        f"instead of {policy}"
    )
    a, m = no_audio.tier_plans(steps)
    return VideoPlan(a, m, fallback="no_audio", warnings=warnings)

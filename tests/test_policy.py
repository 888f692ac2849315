"""Policy strings: parsing, canonical names, the plans forced policies make, every error."""

from __future__ import annotations

import numpy as np
import pytest

from hms_deploy.errors import ConfigError
from hms_deploy.runtime.policy import Policy, parse_policy


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("learned", "learned"),
        ("dense", "dense"),
        ("audio-only", "audio-only"),
        (" Dense ", "dense"),
        ("every:4", "every:4"),
        ("every:4,8", "every:4,8"),
        ("every:3,3", "every:3"),
        ("rates:0.6,0.05", "rates:0.6,0.05"),
        ("rates:0.6,0.05,7", "rates:0.6,0.05,7"),
        ("rates:1,1", "rates:1,1"),
        ("rates:0,0", "rates:0,0"),
    ],
)
def test_parse_and_canonical_name(text, canonical):
    p = parse_policy(text)
    assert str(p) == canonical
    assert parse_policy(str(p)) == p
    assert p.forced == (canonical != "learned")


def test_parse_passes_a_policy_through():
    p = Policy("dense")
    assert parse_policy(p) is p


@pytest.mark.parametrize(
    "text, match",
    [
        ("greedy", "unknown policy 'greedy'"),
        ("", "unknown policy ''"),
        ("every", "expected every:KI"),
        ("every:", "expected every:KI"),
        ("every:0", "KI must be an integer >= 1, got 0"),
        ("every:-2", "KI must be an integer >= 1"),
        ("every:x", "KI must be an integer >= 1, got 'x'"),
        ("every:2,0", "KM must be an integer >= 1"),
        ("every:1,2,3", "expected every:KI"),
        ("rates:0.5", "expected rates:PI,PM"),
        ("rates:0.5,", "expected rates:PI,PM"),
        ("rates:1.5,0.1", "PI must be a number in \\[0, 1\\], got 1.5"),
        ("rates:0.5,-0.1", "PM must be a number in \\[0, 1\\]"),
        ("rates:nan,0", "PI must be a number in \\[0, 1\\]"),
        ("rates:a,0", "PI must be a number in \\[0, 1\\], got 'a'"),
        ("rates:0.1,0.5", "PM \\(0.5\\) must be <= PI \\(0.1\\)"),
        ("rates:0.5,0.1,-1", "SEED must be an integer >= 0"),
        ("rates:0.5,0.1,x", "SEED must be an integer >= 0"),
        ("rates:0.5,0.1,1,2", "expected rates:PI,PM"),
    ],
)
def test_bad_policy_strings(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_policy(text)


def test_bad_policy_type():
    with pytest.raises(ConfigError, match="policy must be a string"):
        parse_policy(3)  # type: ignore[arg-type]


def test_learned_has_no_plan():
    with pytest.raises(ConfigError, match="no fixed plan"):
        parse_policy("learned").plan(8)


def test_dense_and_audio_only_plans():
    a, m = parse_policy("dense").plan(5)
    assert a.tolist() == m.tolist() == [1] * 5
    a, m = parse_policy("audio-only").plan(5)
    assert a.tolist() == m.tolist() == [0] * 5


def test_every_plan():
    a, m = parse_policy("every:2,3").plan(7)
    assert a.tolist() == [1, 0, 1, 0, 1, 0, 1]
    assert m.tolist() == [1, 0, 0, 0, 0, 0, 1]  # t % 3 == 0 and appearance ran
    a, m = parse_policy("every:3").plan(7)
    assert a.tolist() == m.tolist() == [1, 0, 0, 1, 0, 0, 1]
    a, m = parse_policy("every:1").plan(4)
    assert a.tolist() == m.tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("steps", [1, 7, 10, 128])
@pytest.mark.parametrize("rates", [(0.6, 0.03), (0.5, 0.5), (1.0, 0.0), (0.0, 0.0), (0.25, 0.1)])
def test_rates_plan_counts_and_hierarchy(steps, rates):
    pi, pm = rates
    a, m = Policy("rates", rate_appearance=pi, rate_motion=pm).plan(steps)
    assert a.dtype == m.dtype == np.int64 and a.shape == m.shape == (steps,)
    assert int(a.sum()) == int(np.floor(pi * steps + 0.5))
    assert int(m.sum()) == min(int(a.sum()), int(np.floor(pm * steps + 0.5)))
    assert np.all(m <= a)  # hierarchy


def test_rates_plan_is_seeded():
    p = parse_policy("rates:0.5,0.2")
    a1, m1 = p.plan(64)
    a2, m2 = p.plan(64)
    assert np.array_equal(a1, a2) and np.array_equal(m1, m2)
    a3, _ = parse_policy("rates:0.5,0.2,1").plan(64)
    assert not np.array_equal(a1, a3)
    # spread over the video, not the first steps
    assert a1[:32].sum() not in (0, 32)
    # round half up: rates:0.5 of 5 steps is 3, not 2
    assert parse_policy("rates:0.5,0").plan(5)[0].sum() == 3

"""The share of a video its steps' audio windows see (record ``coverage``), and hms-run's
warning when T sees under a quarter of a long video's audio."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from runtime_helpers import STEPS, assets

from hms_deploy.cli.run import main as run_main
from hms_deploy.data.sampling import step_centers, window_coverage
from hms_deploy.data.synthetic import write_video


def test_window_coverage_counts_the_union_inside_the_video():
    assert window_coverage(step_centers(600.0, 8), 0.96, 600.0) == pytest.approx(8 * 0.96)
    # windows that overlap count once; the part outside [0, duration] not at all
    assert window_coverage([1.0, 1.5], 1.0, 10.0) == pytest.approx(1.5)
    assert window_coverage([0.1], 0.96, 10.0) == pytest.approx(0.58)
    assert window_coverage(step_centers(3.0, 16), 0.96, 3.0) == pytest.approx(3.0)


def _json(stdout: str) -> list[dict]:
    return [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]


def test_record_says_how_much_audio_the_steps_see():
    a = assets()
    r = CliRunner().invoke(run_main, [str(a.long), "--engines", str(a.engines), "--json",
                                      "--policy", "audio-only", "--steps", "2"])
    assert r.exit_code == 0, r.output
    (rec,) = _json(r.stdout)
    cov = rec["coverage"]
    assert cov["duration_s"] == pytest.approx(6.0, abs=0.1)
    assert cov["audio_s"] == pytest.approx(2 * 0.96, abs=1e-3)
    assert cov["share"] == pytest.approx(cov["audio_s"] / cov["duration_s"], abs=1e-4)
    assert "warning" not in r.stderr  # a short video: no advice
    r = CliRunner().invoke(run_main, [str(a.long), "--engines", str(a.engines), "--json",
                                      "--policy", "audio-only", "--steps", str(STEPS)])
    (rec,) = _json(r.stdout)
    assert rec["coverage"]["share"] == 1.0  # 16 windows of 0.96 s cover 6 s


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("coverage") / "long40.mp4"
    write_video(path, duration_s=40.0, fps=4, size=(64, 48),
                frame_fn=lambda i, t: np.full((48, 64, 3), (i * 9) % 256, np.uint8),
                audio_fn=lambda t: 0.3 * np.sin(2 * np.pi * 440.0 * t))
    return path


def test_hms_run_warns_when_steps_see_little_of_a_long_video(long_video):
    a = assets()
    r = CliRunner().invoke(run_main, [str(long_video), "--engines", str(a.engines), "--json",
                                      "--policy", "audio-only", "--steps", "4"])
    assert r.exit_code == 0, r.output
    (rec,) = _json(r.stdout)
    assert rec["coverage"]["share"] == pytest.approx(4 * 0.96 / 40.0, abs=2e-3)
    warnings = [x for x in r.stderr.splitlines() if x.startswith("hms-run: warning:")]
    assert len(warnings) == 1, r.stderr
    assert "T=4 steps" in warnings[0] and "raise --steps" in warnings[0]
    assert str(long_video) in warnings[0]
    # enough steps to see a quarter of it: no warning
    r = CliRunner().invoke(run_main, [str(long_video), "--engines", str(a.engines), "--json",
                                      "--policy", "audio-only", "--steps", "12"])
    assert r.exit_code == 0 and "warning" not in r.stderr, r.stderr

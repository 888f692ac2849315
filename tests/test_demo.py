"""The first-hour demo (hms-demo, run by scripts/demo.sh): every stage runs, the test split
and one new sample per class are classified with the exported engines, and the output ends
with the motion-usage line and "demo: K/M correct".

What holds on every machine is checked here: the stages, the lines and their arithmetic.
How many samples a training run gets right depends on the CPU, its kernels and the thread
count; the demo's own size is measured over seeds and thread counts in
benchmarks/demo_seeds.py (benchmarks/results/demo_seeds.md), not asserted in a test.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hms_deploy.cli.demo import DemoResult, GroupUsage
from hms_deploy.cli.demo import main as demo_main

LINE = re.compile(r"^demo: (\d+)/(\d+) correct$")
USAGE = re.compile(r"^motion used: motion classes (\d+\.\d) %, audio classes (\d+\.\d) %, "
                   r"appearance classes (\d+\.\d) %$")
TEST = re.compile(r"^ +test videos: (\d+)/(\d+) correct$")


def test_demo_reduced_size_runs_every_stage(tmp_path):
    r = CliRunner().invoke(demo_main, [str(tmp_path / "demo"), "--quiet", "--workers", "0",
                                       "--per-class", "3", "--duration", "1.5"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    m = LINE.match(lines[-1])
    assert m, lines[-1]
    k, n = int(m.group(1)), int(m.group(2))
    assert n == 6 and 0 <= k <= n
    samples = [ln for ln in lines if "->" in ln and ("ok" in ln or "WRONG" in ln)]
    assert len(samples) == n and sum(" ok " in ln for ln in samples) == k
    u = USAGE.match(lines[-2])
    assert u, lines[-2]
    assert all(0.0 <= float(x) <= 100.0 for x in u.groups())
    t = [TEST.match(ln) for ln in lines if TEST.match(ln)]
    assert len(t) == 1 and t[0].group(2) == "6"  # per-class 3: one test video per class
    for cmd in ("hms-synth dataset", "hms-init", "hms-extract", "hms-train",
                "hms-export", "hms-run"):
        assert any(cmd in ln for ln in lines), cmd
    assert (tmp_path / "demo" / "engines" / "manifest.json").is_file()
    assert sorted(p.name for p in (tmp_path / "demo" / "samples").iterdir()) == sorted(
        f"{c}.mp4" for c in ("tone_low", "tone_high", "red_disc", "green_square", "move_left",
                             "move_right"))


def test_group_usage_counts_motion_steps_per_class_group():
    g = GroupUsage()
    g.add("move_left", {"usage": {"appearance": 5, "motion": 2}, "steps": 8})
    g.add("move_right", {"usage": {"appearance": 4, "motion": 1}, "steps": 8})
    g.add("tone_low", {"usage": {"appearance": 3, "motion": 0}, "steps": 8})
    g.add("red_disc", {"usage": {"appearance": 8, "motion": 1}, "steps": 4})
    g.add("green_square", {"video": "x.mp4", "error": "not a readable media file"})
    shares = g.shares()
    assert shares == pytest.approx({"motion": 3 / 16, "audio": 0.0, "appearance": 1 / 4})
    line = DemoResult(5, 6, shares).usage_line()
    assert line == "motion used: motion classes 18.8 %, audio classes 0.0 %, appearance classes 25.0 %"
    assert USAGE.match(line)


def test_demo_refuses_too_few_videos(tmp_path):
    r = CliRunner().invoke(demo_main, [str(tmp_path / "d"), "--per-class", "2"])
    assert r.exit_code == 2 and "--per-class must be >= 3" in r.output


def test_demo_seeds_table_target_and_parsing():
    """benchmarks/demo_seeds.py: the target rule and the line parsing it applies to hms-demo."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.demo_seeds import LINES, meets_target, parse_seeds

    assert parse_seeds("0-2,5") == [0, 1, 2, 5]
    out = ("   test videos: 20/24 correct\n"
           "motion used: motion classes 25.0 %, audio classes 6.2 %, appearance classes 12.5 %\n"
           "demo: 6/6 correct\n")
    assert LINES["demo"].search(out).groups() == ("6", "6")
    assert LINES["usage"].search(out).groups() == ("25.0", "6.2", "12.5")
    assert LINES["test"].search(out).groups() == ("20", "24")
    run = {"correct": 6, "samples": 6,
           "motion_used_pct": {"motion": 25.0, "audio": 6.2, "appearance": 12.5}}
    assert meets_target(run)
    assert not meets_target({**run, "correct": 5})
    assert not meets_target({**run, "motion_used_pct": {"motion": 12.5, "audio": 12.5,
                                                        "appearance": 0.0}})
    assert not meets_target({**run, "motion_used_pct": {"motion": 0.0, "audio": 0.0,
                                                        "appearance": 0.0}})

"""``hms-bench --smoke``: the seconds-long benchmark CI runs, end to end through the CLI.

Asserts on structure, engine-call counts and GMAC ratios, never on times (a loaded CI
machine can reorder any two timings); times are only checked to be positive.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import appearance_calls

from hms_deploy.runtime.options import DEFAULT_APPEARANCE_BATCH
from hms_deploy.runtime.policy import parse_policy

HMS_BENCH = Path(sys.executable).parent / "hms-bench"
T = 8  # smoke steps
BATCH = 4  # smoke batch of the baselines
RUNS = ("learned", "rates:0.6,0.03", "audio-only", "every:2,32", "dense (stepped)",
        "dense (batched)", "mask (rates:0.6,0.03)")
TIMING = ("total", "decode", "audio", "appearance", "motion", "cells_gates", "other")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [str(HMS_BENCH), "--smoke", "--out", str(d / "out"), "--work-dir", str(d / "work")],
        check=False, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = d / "out" / "smoke_cpu_tiny_onnx.json"
    return json.loads(path.read_text()), path, proc.stdout


def test_results_name_the_machine_versions_and_date(smoke):
    out, _, _ = smoke
    assert out["benchmark"] == "e2e" and out["variant"] == "tiny" and out["engine"] == "onnx"
    assert out["T"] == T
    m = out["machine"]
    assert m["device"] == "cpu" and m["cpu_model"] and m["usable_cores"] >= 1
    assert m["gpu"] is None
    for pkg in ("python", "torch", "onnxruntime", "onnx", "av", "hms_deploy"):
        assert out["versions"][pkg], pkg
    assert out["date"].endswith("Z") and "commit" in out["git"]
    v = out["video"]
    assert v["duration_s"] == pytest.approx(6.0, abs=0.1) and v["keyframe_interval_s"] == 2.0


def test_every_run_has_every_figure(smoke):
    out, _, _ = smoke
    assert tuple(out["runs"]) == RUNS
    for name, r in out["runs"].items():
        assert set(r["timing_ms"]) == set(TIMING), name
        for key in ("median", "p25", "p75", "iqr", "min", "max", "n"):
            assert key in r["wall_ms"], (name, key)
        assert r["wall_ms"]["median"] > 0 and r["wall_ms"]["n"] >= 1
        assert r["timing_ms"]["total"]["median"] > 0
        assert r["cpu_ms"]["median"] >= 0
        assert r["gmac"] > 0 and r["gmac_dense"] >= r["gmac"] - 1e-9
        assert r["steps"] == T


def test_call_counts_prove_skipping_and_computing(smoke):
    out, _, _ = smoke
    runs = out["runs"]
    batches = math.ceil(T / BATCH)
    for name in ("dense (batched)", "mask (rates:0.6,0.03)"):
        c = runs[name]["engine_calls"]
        for part in ("audio_backbone", "appearance_backbone", "motion_backbone"):
            assert c[part] == batches, (name, part)
        assert c["appearance_cell"] == c["motion_cell"] == T
    mask = runs["mask (rates:0.6,0.03)"]["engine_calls"]
    assert mask["appearance_gate"] == mask["motion_gate"] == T  # research code: every gate
    stepped = runs["dense (stepped)"]["engine_calls"]
    assert stepped["appearance_backbone"] == stepped["motion_backbone"] == T
    hms = runs["rates:0.6,0.03"]
    calls = hms["engine_calls"]
    assert hms["usage"]["appearance"] == round(0.6 * T)
    # a forced plan: the appearance frames of several steps per call (appearance_ahead.py)
    plan_a, plan_m = parse_policy("rates:0.6,0.03").plan(T)
    assert calls["appearance_backbone"] == appearance_calls(plan_a, plan_m, DEFAULT_APPEARANCE_BATCH)
    assert calls["appearance_backbone"] < hms["usage"]["appearance"]
    assert hms["engine_calls"]["motion_backbone"] == hms["usage"]["motion"]
    assert hms["host_reads"] == 0  # forced policies read nothing back inside the loop
    learned = runs["learned"]
    assert learned["host_reads"] == T + learned["usage"]["appearance"]
    ao = runs["audio-only"]
    assert ao["engine_calls"]["appearance_backbone"] == ao["engine_calls"]["motion_backbone"] == 0
    assert ao["decode"]["frames_decoded"] == 0
    assert all(v is True or isinstance(v, dict) for v in out["checks"].values()), out["checks"]


def test_gmac_ratios_and_summary(smoke):
    out, _, _ = smoke
    runs, su = out["runs"], out["summary"]
    costs = out["model"]["part_gmac"]
    dense = runs["dense (stepped)"]["gmac"]
    assert runs["dense (batched)"]["gmac"] == pytest.approx(dense)
    assert runs["mask (rates:0.6,0.03)"]["gmac"] == pytest.approx(dense)  # it launched it all
    assert runs["audio-only"]["gmac"] < runs["rates:0.6,0.03"]["gmac"] < dense
    base = costs["audio_backbone"] + costs["audio_cell"] + costs["appearance_gate"]
    assert runs["audio-only"]["gmac"] == pytest.approx(T * base + costs["head"], rel=1e-3)
    hms = runs["rates:0.6,0.03"]
    assert su["gmac_ratio_hms_over_dense"] == pytest.approx(hms["gmac"] / dense, abs=1e-4)
    assert runs["mask (rates:0.6,0.03)"]["gmac_decided"] == pytest.approx(hms["gmac"], rel=1e-3)
    for key in ("wall_ratio_hms_over_dense", "gmac_ratio_hms_over_dense", "speedup_over_mask",
                "wall_ratio_over_gmac_ratio", "cpu_ratio_hms_over_dense"):
        assert su[key] > 0, key
    assert abs(su["overhead_fraction"]) < 1
    assert su["better_dense"] in ("dense (stepped)", "dense (batched)")
    assert su["mask_decisions_equal_hms"] is True
    for t in su["targets"].values():
        assert isinstance(t["holds"], bool) and t["limit"] > 0


def test_throughput_and_reports(smoke):
    out, path, _ = smoke
    tp = out["throughput"]
    assert tp["videos"] == 2
    for mode in ("sequential", "lockstep"):
        assert tp[mode]["videos_per_s"] > 0 and tp[mode]["wall_s"]["median"] > 0
    assert tp["lockstep"]["batch_size"] == 2
    md = path.with_suffix(".md").read_text()
    assert "| rates:0.6,0.03 | session |" in md and "## Summary" in md
    # a smoke run's figures say nothing about the targets: it says so instead of met/missed
    assert "targets do not apply" in md and "n/a (smoke mode)" in md
    assert "missed" not in md and ": met" not in md
    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_smoke_run_says_targets_do_not_apply(smoke):
    *_, stdout = smoke
    assert stdout.strip().splitlines()[-1] == (
        "hms-bench: smoke mode: a seconds-long check that the suite runs (tiny model, few "
        "steps, one repeat); its targets do not apply")
    assert "missed" not in stdout


def test_cli_refuses_bad_options_in_one_line():
    proc = subprocess.run([str(HMS_BENCH), "--steps", "0"], check=False, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["hms-bench: error: --steps must be >= 1, got 0"]


def test_cli_soak_needs_the_serve_suite():
    proc = subprocess.run([str(HMS_BENCH), "--soak", "10"], check=False, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "hms-bench: error: --soak N needs --suite serve and N >= 1, got --suite e2e --soak 10"]


def test_ab_records_compare_the_fields_both_versions_write():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.e2e_ab import records_equal

    def rounds(base: dict, this: dict) -> list:
        return [{"base": {"runs": {"learned": {"record": base}}},
                 "this": {"runs": {"learned": {"record": this}}}}]

    old = {"label": "a", "logits": [0.5, 1.0]}
    assert records_equal(rounds(old, {**old, "coverage": {"share": 1.0}})) == (
        True, "fields only this tree writes: coverage")
    assert records_equal(rounds(old, {**old, "logits": [0.5, 1.5]})) == (False, "")
    assert records_equal(rounds({**old, "gone": 1}, old)) == (True, "fields only the baseline writes: gone")

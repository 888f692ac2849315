"""Evaluation: the budgeted forward (gating.gated_step over BudgetStepOps) equals the
unbudgeted reference at an infinite budget, never exceeds a budget, follows the rule step
by step; hms-eval writes JSON and plots; the small synthetic study runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hms_deploy.checkpoint import init_checkpoint, save_checkpoint
from hms_deploy.config import tiny_config
from hms_deploy.costs import video_cost
from hms_deploy.data.feature_batches import FeatureSource
from hms_deploy.data.features import FeatureStore, StoreMeta, backbone_hash, open_store
from hms_deploy.eval.evaluate import evaluate
from hms_deploy.eval.predict import budgeted_forward, predict_hms
from hms_deploy.model.hms import reference_forward

C, T, N = 4, 8, 12
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt():
    return init_checkpoint(tiny_config(C, steps=T), seed=3)


@pytest.fixture(scope="module")
def model(ckpt):
    m = ckpt.build_model()
    with torch.no_grad():  # gates that fire on some steps and not others
        m.appearance_gate.linear.bias.copy_(torch.tensor([0.0, 0.05]))
        m.motion_gate.linear.bias.copy_(torch.tensor([0.0, 0.02]))
    return m


def raw_feats(cfg, n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, T, cfg.backbone(m).feat_dim, generator=g) * 3
            for m in ("audio", "appearance", "motion")}


def test_infinite_budget_equals_the_reference(model, ckpt):
    feats = raw_feats(ckpt.config)
    ref, _ = reference_forward(model, feats)
    logits, g_i, g_m, steps, used = budgeted_forward(model, feats, ckpt.costs, math.inf)
    assert 0 < ref.appearance.mean() < 1 and 0 < ref.motion.mean() < 1  # mixed decisions
    assert torch.equal(logits, ref.logits)
    np.testing.assert_array_equal(g_i, ref.appearance.numpy())
    np.testing.assert_array_equal(g_m, ref.motion.numpy())
    assert (steps == T).all()
    want = [video_cost(ckpt.costs, steps=T, appearance=int(a), motion=int(m))
            for a, m in zip(g_i.sum(1), g_m.sum(1))]
    np.testing.assert_allclose(used, want, rtol=1e-12)
    # and the masked forward (used for unbudgeted evaluation) agrees with both
    masked = model.masked_forward(feats, tau=None)
    torch.testing.assert_close(masked.logits, ref.logits, rtol=1e-5, atol=1e-6)


def test_used_never_exceeds_the_budget(model, ckpt):
    feats = raw_feats(ckpt.config, seed=1)
    _, _, _, _, used_inf = budgeted_forward(model, feats, ckpt.costs, math.inf)
    s = ckpt.costs
    floor = s["audio_backbone"] + s["audio_cell"] + s["appearance_gate"] + s["head"]
    for b in np.geomspace(floor, used_inf.max() * 1.2, 15):
        _, g_i, g_m, steps, used = budgeted_forward(model, feats, ckpt.costs, float(b))
        assert (used <= b * (1 + 1e-9)).all(), b
        assert (steps >= 1).all()
        want = [video_cost(ckpt.costs, steps=int(k), appearance=int(a), motion=int(m))
                for k, a, m in zip(steps, g_i.sum(1), g_m.sum(1))]
        np.testing.assert_allclose(used, want, rtol=1e-12)
        for i in range(N):  # nothing recorded after the last finished step
            assert g_i[i, steps[i]:].sum() == 0 and g_m[i, steps[i]:].sum() == 0
        assert (g_m <= g_i).all()  # hierarchy


def test_budget_rule_step_by_step(model, ckpt):
    """base 1, appearance 10, motion 100, head 0.5 GMAC; gates always fire."""
    costs = {"audio_backbone": 1.0, "audio_cell": 0.0, "appearance_gate": 0.0,
             "appearance_backbone": 10.0, "appearance_cell": 0.0, "motion_gate": 0.0,
             "motion_backbone": 100.0, "motion_cell": 0.0, "head": 0.5}
    m = ckpt.build_model()
    with torch.no_grad():
        for gate in (m.appearance_gate, m.motion_gate):
            gate.linear.weight.zero_()
            gate.linear.bias.copy_(torch.tensor([0.0, 1.0]))
    feats = raw_feats(ckpt.config, n=1)
    # 11.5: step 0 = base + appearance (+ head); motion vetoed; step 1 cannot start
    _, g_i, g_m, steps, used = budgeted_forward(m, feats, costs, 11.5)
    assert steps[0] == 1 and g_i[0, :1].tolist() == [1] and g_m[0, :1].tolist() == [0]
    assert used[0] == pytest.approx(11.5)
    # 13: step 1 starts (12.5 <= 13) but its appearance is vetoed (22.5 > 13) and fused
    _, g_i, g_m, steps, used = budgeted_forward(m, feats, costs, 13.0)
    assert steps[0] == 2 and g_i[0, :2].tolist() == [1, 0] and used[0] == pytest.approx(12.5)
    # 111.5: step 0 runs everything
    _, g_i, g_m, steps, used = budgeted_forward(m, feats, costs, 111.5)
    assert g_i[0, 0] == 1 and g_m[0, 0] == 1 and steps[0] == 1


@pytest.fixture(scope="module")
def store(tmp_path_factory, ckpt):
    cfg = ckpt.config
    dims = {m: cfg.backbone(m).feat_dim for m in ("audio", "appearance", "motion")}
    root = tmp_path_factory.mktemp("eval") / "st"
    s = FeatureStore.open_for_writing(root, StoreMeta(
        steps=T, dtype="float32", dims=dims, labels=list(ckpt.labels),
        backbone_hash=backbone_hash(cfg, ckpt.state_dict)))
    feats = raw_feats(cfg, n=16, seed=5)
    for i in range(16):
        s.add(feats={m: feats[m][i].numpy() for m in dims}, key=f"v{i}", path=f"v{i}",
              label=ckpt.labels[i % 3], label_index=i % 3, duration_s=1.0, has_audio=True)
    s.close()
    return open_store(root)


def test_evaluate_reports_and_curve(model, ckpt, store):
    ck = ckpt
    ck.state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    groups = {ck.labels[0]: "audio", ck.labels[1]: "motion", ck.labels[2]: "motion"}
    r = evaluate(ck, store, budgets=[0.05, 0.2, 1.0], groups=groups, sample_videos=5)
    assert r["n_classes_excluded"] == 1  # class 3 has no video
    assert 0.0 <= r["map"] <= 1.0 and r["policy"] == "hms" and r["unit"] == "GMAC"
    pred = predict_hms(model, FeatureSource(store), ck.costs)
    assert r["gmacs_per_video"] == pytest.approx(pred.gmacs.mean())
    assert r["usage"]["motion"] == pytest.approx(pred.motion.mean())
    assert set(r["usage_by_group"]) == {"audio", "motion"}
    assert len(r["samples"]) == 5 and len(r["samples"][0]["appearance"]) == T
    curve = r["budget_curve"]
    assert [c["budget"] for c in curve] == [0.05, 0.2, 1.0, None]
    for c in curve[:-1]:
        assert c["max_gmacs"] <= c["budget"] * (1 + 1e-9)
    assert curve[-1]["map"] == pytest.approx(r["map"])
    assert curve[-1]["gmacs_per_video"] == pytest.approx(r["gmacs_per_video"])


def test_eval_cli_writes_json_and_plots(tmp_path, model, ckpt, store):
    from hms_deploy.cli.evaluate import main as eval_main

    ckpt.state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(ckpt, tmp_path / "ck.pt")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"name": "early fusion A+I+M", "map": 0.5,
                                 "gmacs_per_video": 3.0}))
    r = CliRunner().invoke(eval_main, [
        "--store", str(store.root), "--checkpoint", str(tmp_path / "ck.pt"),
        "--out", str(tmp_path / "ev"), "--budgets", "0.05,0.5", "--interpolated",
        "--compare", str(other)])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert res["interpolated"] is True and len(res["budget_curve"]) == 3
    for name in ("cost_vs_map.png", "motion_usage_per_class.png", "usage_heatmap.png"):
        assert (tmp_path / "ev" / name).stat().st_size > 1000
    r = CliRunner().invoke(eval_main, ["--store", str(store.root), "--checkpoint",
                                       str(tmp_path / "ck.pt"), "--budgets", "0.000001"])
    assert r.exit_code == 2 and "cannot afford one step" in r.output  # a usage error
    r = CliRunner().invoke(eval_main, ["--store", str(store.root), "--checkpoint",
                                       str(tmp_path / "ck.pt"), "--budgets", "x"])
    assert r.exit_code == 2 and "not a number" in r.output
    # without --out, stdout is the JSON alone (the summary goes to stderr)
    r = CliRunner().invoke(eval_main, ["--store", str(store.root), "--checkpoint",
                                       str(tmp_path / "ck.pt"), "--budgets", "0.5"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["budget_curve"][0]["budget"] == 0.5
    assert "GMAC/video" in r.stderr


def test_motion_plot_without_motion_has_a_readable_axis(tmp_path):
    from hms_deploy.eval.plots import motion_usage_per_class, percent_ylim

    assert percent_ylim([0.0, 0.0]) == (0.0, 5.0)  # not matplotlib's -0.04..0.04
    assert percent_ylim([40.0, 2.0]) == (0.0, pytest.approx(44.0))
    assert percent_ylim([100.0]) == (0.0, 100.0)
    result = {"usage_per_class": {"a": {"motion": 0.0}, "b": {"motion": 0.0}}}
    path = motion_usage_per_class(result, tmp_path / "m.png")
    assert path.stat().st_size > 1000


def test_small_study_runs(tmp_path):
    script = ROOT / "benchmarks" / "synthetic_quality.py"
    r = subprocess.run([sys.executable, str(script), "--small", "--work", str(tmp_path / "w"),
                        "--out", str(tmp_path / "q.json")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "q.json").read_text())
    assert res["seeds"] == [0] and list(res["per_seed"]) == ["0"]
    one = res["per_seed"]["0"]
    for k in ("hms", "early_fusion"):
        assert 0.0 <= one[k]["map"] <= 1.0 and one[k]["gmacs_per_video"] > 0
        assert res["summary"][f"{k}_map"]["mean"] == one[k]["map"]
    assert set(one["motion_usage_by_group"]) == {"audio", "appearance", "motion"}
    assert 0.0 <= one["finetune_val_step_accuracy"] <= 1.0
    assert one["finetune"]["runs"][0]["trained"] == ["motion"]
    assert res["mode"] == "small" and "versions" in res and "command" in res
    assert "load_average_1_5_15" in res and res["total_seconds"] > 0

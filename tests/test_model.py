"""The HMS model: masked training forward == skipping reference; semantics; parts; costs."""

from __future__ import annotations

import pytest
import torch
from helpers import make_gates_mixed, random_features

from hms_deploy import gating
from hms_deploy.config import make_config
from hms_deploy.costs import dense_cost, example_inputs, measure_part_costs, video_cost
from hms_deploy.errors import ConfigError
from hms_deploy.model.hms import HMS, reference_forward
from hms_deploy.parts import PART_NAMES, part_specs


@pytest.fixture(scope="module")
def paper_model():
    torch.manual_seed(0)
    return HMS(make_config("paper", 12)).eval()


def _check_masked_equals_reference(model: HMS, n: int, steps: int) -> None:
    feats = random_features(model.cfg, n, steps, seed=1)
    make_gates_mixed(model, feats)
    with torch.no_grad():
        masked = model.masked_forward(feats)
    ref, ops = reference_forward(model, feats)
    # decisions are mixed: some steps on, some off, motion sometimes on
    assert 0 < masked.appearance.mean() < 1
    assert 0 < masked.motion.sum() < masked.appearance.sum()
    torch.testing.assert_close(ref.appearance, masked.appearance, rtol=0, atol=0)
    torch.testing.assert_close(ref.motion, masked.motion, rtol=0, atol=0)
    torch.testing.assert_close(ref.logits, masked.logits, rtol=1e-5, atol=1e-6)
    # the reference really skipped: one projection/cell call per step that ran something
    steps_with_i = int((masked.appearance.sum(0) > 0).sum())
    steps_with_m = int((masked.motion.sum(0) > 0).sum())
    assert ops.calls["appearance_feature"] == ops.calls["appearance_cell"] == steps_with_i
    assert ops.calls["motion_feature"] == ops.calls["motion_cell"] == steps_with_m
    assert ops.calls["appearance_gate"] == steps
    assert ops.calls["motion_gate"] == steps_with_i


def test_masked_forward_equals_skipping_reference_tiny():
    torch.manual_seed(0)
    _check_masked_equals_reference(HMS(make_config("tiny", 6)).eval(), n=4, steps=24)


def test_masked_forward_equals_skipping_reference_paper(paper_model):
    _check_masked_equals_reference(paper_model, n=2, steps=10)


def test_hierarchy_and_fusion_hold_in_masked_forward():
    torch.manual_seed(0)
    model = HMS(make_config("tiny", 6)).eval()
    feats = random_features(model.cfg, 3, 16)
    make_gates_mixed(model, feats)
    out = model.masked_forward(feats)
    assert torch.all(out.motion <= out.appearance)  # motion only where appearance ran


def test_batched_lockstep_equals_one_video_at_a_time():
    torch.manual_seed(0)
    model = HMS(make_config("tiny", 6)).eval()
    feats = random_features(model.cfg, 5, 12, seed=3)
    make_gates_mixed(model, feats)
    batched, _ = reference_forward(model, feats)
    for i in range(5):
        one, _ = reference_forward(model, {m: f[i:i + 1] for m, f in feats.items()})
        torch.testing.assert_close(one.appearance, batched.appearance[i:i + 1], rtol=0, atol=0)
        torch.testing.assert_close(one.motion, batched.motion[i:i + 1], rtol=0, atol=0)
        torch.testing.assert_close(one.logits, batched.logits[i:i + 1], rtol=1e-5, atol=1e-6)


def test_decide_ties_skip_and_matches_argmax():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [-1.0, -1.0]])
    assert gating.decide(logits).tolist() == [1, 0, 0, 0]
    assert gating.decide(logits).dtype == torch.int64


def test_fuse_overwrites_prefix_and_keeps_rest():
    h_lower = torch.full((2, 3), 7.0)
    h_prev = torch.arange(16.0).reshape(2, 8)
    fused = gating.fuse(h_lower, h_prev)
    assert fused.shape == (2, 8)
    assert torch.equal(fused[:, :3], h_lower)
    assert torch.equal(fused[:, 3:], h_prev[:, 3:])


def test_gumbel_decisions_are_hard_with_straight_through_gradient():
    logits = torch.randn(256, 2, requires_grad=True)
    g = gating.gumbel_decide(logits, tau=5.0, generator=torch.Generator().manual_seed(0))
    assert set(g.detach().unique().tolist()) <= {0.0, 1.0}
    assert 0.2 < g.detach().mean() < 0.8
    g.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_gumbel_follows_logits_at_low_temperature():
    logits = torch.tensor([[0.0, 4.0]]).repeat(2000, 1)
    g = gating.gumbel_decide(logits, tau=0.5, generator=torch.Generator().manual_seed(0))
    assert g.mean() > 0.95  # P(use) = sigmoid(4) = 0.982


def test_masked_forward_trains_gates_through_decisions():
    torch.manual_seed(0)
    model = HMS(make_config("tiny", 6))
    feats = random_features(model.cfg, 4, 6)
    out = model.masked_forward(feats, tau=5.0, generator=torch.Generator().manual_seed(0))
    (out.logits.sum() + out.appearance.sum() + out.motion.sum()).backward()
    assert model.appearance_gate.linear.weight.grad.abs().sum() > 0
    assert model.motion_gate.linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["tiny", "paper"])
def test_every_part_accepts_its_spec_inputs_and_gives_spec_outputs(variant, paper_model):
    model = paper_model if variant == "paper" else HMS(make_config("tiny", 12)).eval()
    specs = part_specs(model.cfg)
    inputs = example_inputs(model.cfg, n=2)
    for name in PART_NAMES:
        if variant == "paper" and name == "motion_backbone":
            continue  # 100 GMAC at batch 2; covered by the cost test at batch 1
        with torch.no_grad():
            out = model.part(name)(*inputs[name].values())
        out = out if isinstance(out, tuple) else (out,)
        for t, o in zip(specs[name].outputs, out):
            assert tuple(o.shape) == t.with_batch(2), (name, t.name)
            assert str(o.dtype).removeprefix("torch.") == t.dtype, (name, t.name)


def test_tiny_costs_keep_the_paper_order():
    costs = measure_part_costs(HMS(make_config("tiny", 6)).eval())
    assert costs["audio_backbone"] * 5 < costs["appearance_backbone"]
    assert costs["appearance_backbone"] * 10 < costs["motion_backbone"]


def test_paper_costs_match_the_measured_figures(paper_model):
    costs = measure_part_costs(paper_model, parts=["audio_backbone", "appearance_backbone",
                                                    "motion_backbone"])
    assert costs["audio_backbone"] == pytest.approx(0.069, rel=0.03)
    assert costs["appearance_backbone"] == pytest.approx(0.96, rel=0.03)
    assert costs["motion_backbone"] == pytest.approx(50.3, rel=0.03)
    m256 = HMS(make_config("paper", 12, motion_crop=256)).eval()
    assert measure_part_costs(m256, parts=["motion_backbone"])["motion_backbone"] == pytest.approx(
        65.7, rel=0.03)


def test_video_cost_counts_tiers():
    costs = {p: 0.0 for p in PART_NAMES}
    costs.update(audio_backbone=1.0, appearance_backbone=10.0, motion_backbone=100.0, head=0.5)
    assert video_cost(costs, steps=4, appearance=2, motion=1) == 4 + 20 + 100 + 0.5
    assert dense_cost(costs, 4) == 4 * 111 + 0.5


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="unknown variant 'huge'"):
        make_config("huge", 5)
    with pytest.raises(ConfigError, match="num_classes must be >= 2"):
        make_config("tiny", 1)
    with pytest.raises(ConfigError, match="motion crop must be 224 or 256"):
        make_config("paper", 5, motion_crop=300)

"""The baseline executors (runtime/dense.py) compute what the Session computes.

- dense batched == Session ``dense`` (probabilities within 1e-5);
- compute-then-mask == Session for the learned gates and for forced policies
  (decisions exactly, probabilities within 1e-5);
- both launch every backbone ceil(T / batch) times, and the mask executor runs every
  cell and both gates on every step;

on a tiny model whose gates are calibrated to give mixed decisions on the test video,
over the torch engines and the ONNX export.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hms_deploy.checkpoint import init_checkpoint, save_checkpoint
from hms_deploy.config import make_config
from hms_deploy.errors import ConfigError
from hms_deploy.runtime.dense import (
    classify_compute_then_mask,
    classify_dense_batched,
)
from hms_deploy.runtime.frames import VideoInputs
from hms_deploy.runtime.session import Session

T = 10
BATCH = 4
NUM_CLASSES = 5


def _raw_features(model, video, steps):
    """Raw backbone features (1, T, D) of every step of ``video`` (for calibrating the gates)."""
    inputs = VideoInputs(video, model.cfg, steps)
    try:
        mel = torch.from_numpy(inputs.audio_patches(inputs.decode_audio()))
        frames = torch.from_numpy(inputs.sampler.appearance_inputs(inputs.source))
        clips = torch.from_numpy(inputs.sampler.motion_inputs(inputs.source))
    finally:
        inputs.close()
    with torch.no_grad():
        return {
            "audio": model.audio_backbone.encoder(mel)[None],
            "appearance": model.appearance_backbone.encoder(frames)[None],
            "motion": model.motion_backbone.encoder(clips)[None],
        }


@torch.no_grad()
def _calibrate_gates(model, feats, seed=0):
    """Gates that read only the features (not the states), thresholded between two steps'
    scores: appearance on for half of the steps, motion for half of those; no near-ties."""
    g = torch.Generator().manual_seed(seed)
    p_a = model.project("audio", feats["audio"])[0]  # (T, P_A)
    p_i = model.project("appearance", feats["appearance"])[0]
    on = torch.ones(p_a.shape[0], dtype=torch.bool)
    for gate, x in ((model.appearance_gate, p_a), (model.motion_gate, torch.cat([p_a, p_i], 1))):
        v = torch.randn(x.shape[1], generator=g)
        score = x @ v
        v = v / score.std()
        score = x @ v
        ranked = score[on].sort().values
        k = ranked.numel() // 2
        threshold = 0.5 * (ranked[k - 1] + ranked[k])
        gate.linear.weight.zero_()
        gate.linear.bias.zero_()
        gate.linear.weight[1, : x.shape[1]] = v
        gate.linear.bias[1] = -threshold
        on = on & (score > threshold)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """(video, checkpoint, export dir) of a tiny model with mixed gate decisions."""
    from hms_deploy.data.synthetic import make_reference_video
    from hms_deploy.export.pipeline import export_checkpoint

    d = tmp_path_factory.mktemp("dense")
    video = make_reference_video(d / "ref.mp4", duration_s=4.0, size=(320, 180))
    torch.manual_seed(0)
    ckpt = init_checkpoint(make_config("tiny", NUM_CLASSES), seed=0)
    model = ckpt.build_model().eval()
    _calibrate_gates(model, _raw_features(model, str(video), T))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = dataclasses.replace(ckpt, state_dict=weights)
    ck = save_checkpoint(ckpt, d / "ckpt.pt")
    engines = d / "engines"
    export_checkpoint(ck, engines)
    return str(video), ck, engines


@pytest.fixture(scope="module", params=["torch", "onnx"])
def session(request, model_files):
    _, ck, engines = model_files
    if request.param == "torch":
        s = Session(checkpoint=ck, engine="torch")
    else:
        s = Session(engines_dir=engines, engine="onnx")
    with s:
        yield s


def _probs(rec):
    assert len(rec["topk"]) == NUM_CLASSES
    return {label: p for label, p in rec["topk"]}


def _assert_probs_close(a, b):
    pa, pb = _probs(a), _probs(b)
    assert set(pa) == set(pb)
    for k in pa:
        assert pa[k] == pytest.approx(pb[k], abs=1e-5, rel=0)


def test_dense_batched_equals_session_dense(session, model_files):
    video = model_files[0]
    ref = session.classify(video, steps=T, policy="dense", topk=NUM_CLASSES)
    got = classify_dense_batched(session.engine_set, video, steps=T, batch=BATCH,
                                 topk=NUM_CLASSES)
    _assert_probs_close(got, ref)
    assert got["decisions"] == ref["decisions"] == {"appearance": [1] * T, "motion": [1] * T}
    assert got["gflops"]["used"] == pytest.approx(ref["gflops"]["used"])
    assert got["gflops"]["used"] == pytest.approx(got["gflops"]["dense"])
    assert got["executor"] == "dense_batched"
    # the Session's record, plus additions
    assert set(ref) - {"checkpoint"} <= set(got)
    assert set(got["timing_ms"]) == set(ref["timing_ms"])
    assert got["timing_ms"]["total"] >= got["timing_ms"]["decode"] > 0


@pytest.mark.parametrize("policy", ["learned", "rates:0.6,0.3", "every:2,4", "audio-only"])
def test_compute_then_mask_equals_session(session, model_files, policy):
    video = model_files[0]
    ref = session.classify(video, steps=T, policy=policy, topk=NUM_CLASSES)
    got = classify_compute_then_mask(session.engine_set, video, steps=T, policy=policy,
                                     batch=BATCH, topk=NUM_CLASSES)
    assert got["decisions"] == ref["decisions"]
    assert got["usage"] == ref["usage"]
    _assert_probs_close(got, ref)
    assert got["policy"] == ref["policy"]
    assert got["gflops"]["decided"] == pytest.approx(ref["gflops"]["used"])
    assert got["gflops"]["used"] == pytest.approx(got["gflops"]["dense"])  # it computed it all
    if policy == "learned":  # the calibrated gates give a test that means something
        assert 0 < ref["usage"]["appearance"] < T
        assert 0 < ref["usage"]["motion"] < ref["usage"]["appearance"]
        assert ref["stats"]["host_reads"] == T + ref["usage"]["appearance"]
    assert got["stats"]["host_reads"] == 0 and got["stats"]["decision_reads"] == 1


def test_compute_then_mask_follows_the_no_audio_fallback(session, tmp_path):
    """The baseline applies the Session's per-video plan: a video without audio falls back."""
    from hostile_media import video as make_video

    silent = make_video(tmp_path / "noaudio.mp4", duration_s=2.0, audio="none")
    ref = session.classify(silent, steps=T, topk=NUM_CLASSES)
    got = classify_compute_then_mask(session.engine_set, silent, steps=T, batch=BATCH,
                                     topk=NUM_CLASSES)
    assert ref["fallback"] == got["fallback"] == "no_audio"
    assert got["decisions"] == ref["decisions"] and got["decisions"]["appearance"] == [1] * T
    assert got["warnings"] == ref["warnings"]
    _assert_probs_close(got, ref)


def test_backbone_call_counts(session, model_files):
    video = model_files[0]
    es = session.engine_set
    want = {p: math.ceil(T / BATCH) for p in ("audio_backbone", "appearance_backbone", "motion_backbone")}

    dense = classify_dense_batched(es, video, steps=T, batch=BATCH)["stats"]["engine_calls"]
    assert {p: dense[p] for p in want} == want
    assert dense["audio_cell"] == dense["appearance_cell"] == dense["motion_cell"] == T
    assert dense["appearance_gate"] == dense["motion_gate"] == 0  # every gate on: none launched
    assert dense["head"] == 1

    mask = classify_compute_then_mask(es, video, steps=T, policy="rates:0.6,0.1",
                                      batch=BATCH)["stats"]["engine_calls"]
    assert {p: mask[p] for p in want} == want
    for part in ("audio_cell", "appearance_cell", "motion_cell", "appearance_gate", "motion_gate"):
        assert mask[part] == T, part
    assert mask["head"] == 1

    # the audio backbone can have its own batch
    calls = classify_dense_batched(es, video, steps=T, batch=BATCH, audio_batch=T)
    assert calls["stats"]["engine_calls"]["audio_backbone"] == 1


def test_baselines_decode_every_step(session, model_files):
    rec = classify_dense_batched(session.engine_set, model_files[0], steps=T, batch=BATCH)
    assert rec["stats"]["appearance_frames"] == rec["stats"]["motion_clips"] == T


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_batch_is_refused(session, model_files, bad):
    with pytest.raises(ConfigError, match="batch must be an integer >= 1"):
        classify_dense_batched(session.engine_set, model_files[0], steps=T, batch=bad)
    with pytest.raises(ConfigError, match="audio_batch must be an integer >= 1"):
        classify_compute_then_mask(session.engine_set, model_files[0], steps=T, audio_batch=bad)


def test_bad_policy_is_refused(session, model_files):
    with pytest.raises(ConfigError, match="unknown policy"):
        classify_compute_then_mask(session.engine_set, model_files[0], steps=T, policy="sometimes")


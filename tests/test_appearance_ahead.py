"""Appearance frames of several steps per backbone call for plans known in advance
(runtime/appearance_ahead.py): the same records as step by step, fewer calls, the same
decoder walk; learned, budgeted and mixed batches keep the step-by-step path bit for bit.

Runs on ``torch`` (checkpoint), ``onnx`` (export) and ``trt-emulated`` (the TensorRT
backend over tests/trt_emulator.py, whose output buffers are reused across calls).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import replace

import numpy as np
import pytest
from helpers import appearance_calls
from runtime_helpers import STEPS, assets, one_torch_thread  # noqa: F401 - autouse fixture

from hms_deploy.costs import dense_cost
from hms_deploy.errors import ConfigError
from hms_deploy.runtime.appearance_ahead import chunk_steps
from hms_deploy.runtime.frames import DecodeOptions
from hms_deploy.runtime.options import DEFAULT_APPEARANCE_BATCH
from hms_deploy.runtime.policy import parse_policy
from hms_deploy.runtime.session import Session

BACKENDS = ["torch", "onnx", "trt-emulated"]
# appearance only (one segment), sparse with motion, regular with motion, dense (chunks of 1)
FORCED = ["rates:1,0", "rates:0.5,0.125", "every:2,4", "dense"]
# decoder counters that depend on the read-ahead thread's timing (docs/record.md)
TIMED = ("frames_decoded", "frames_walked", "frames_skipped", "frames_converted", "window_hits")


@pytest.fixture(scope="module", params=BACKENDS)
def session(request):
    a = assets()
    with contextlib.ExitStack() as stack:
        if request.param == "trt-emulated":
            from runtime_helpers import emulated_export_dir
            from trt_emulator import emulated_tensorrt, installed

            stack.enter_context(installed())
            s = Session(engines_dir=emulated_export_dir(), engine="trt", device="cpu",
                        streams=emulated_tensorrt().emulated_device)
        elif request.param == "torch":
            s = Session(checkpoint=a.checkpoint)
        else:
            s = Session(engines_dir=a.engines, engine="onnx")
        with s:
            yield s


@pytest.fixture(scope="module")
def onnx_session():
    with Session(engines_dir=assets().engines, engine="onnx") as s:
        yield s


def decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hms-")]


def probs(rec) -> dict[str, float]:
    return dict(map(tuple, rec["topk"]))


def assert_tolerance_equal(got, ref):
    """Same decisions, usage, cost and frames; probabilities within 1e-5."""
    for key in ("video", "steps", "decisions", "usage", "gflops", "has_audio", "warnings",
                "fallback", "policy", "budget", "T"):
        assert got[key] == ref[key], key
    p, q = probs(got), probs(ref)
    assert p.keys() == q.keys()
    assert max(abs(p[k] - q[k]) for k in p) <= 1e-5
    g, r = got["stats"], ref["stats"]
    for key in ("appearance_frames", "motion_clips", "seeks", "host_reads", "batch"):
        assert g[key] == r[key], key
    for part in set(g["engine_calls"]) - {"appearance_backbone"}:
        assert g["engine_calls"][part] == r["engine_calls"][part], part


def assert_bit_identical(got, ref):
    """The step-by-step path: everything equal but timing and the timed decoder counters."""
    def strip(r):
        return {**r, "timing_ms": None,
                "stats": {k: v for k, v in r["stats"].items() if k not in TIMED}}

    assert strip(got) == strip(ref)


# ----------------------------------------------------------------------------- chunks


def test_chunks_end_after_a_motion_step_and_at_the_size():
    a = np.array([1, 0, 1, 1, 0, 1, 1, 1, 1, 1])
    m = np.array([0, 0, 0, 1, 0, 0, 0, 0, 0, 0])
    assert chunk_steps(a, m, 0, 8) == [0, 2, 3]  # ends at step 3 (its clip comes next)
    assert chunk_steps(a, m, 5, 3) == [5, 6, 7]
    assert chunk_steps(a, m, 8, 8) == [8, 9]  # the end of the video
    assert chunk_steps(a, m, 3, 8) == [3]  # motion on the first step: that step alone
    assert chunk_steps(a, m, 0, 1) == [0]


# ----------------------------------------------------------------- forced plans, N = 1


@pytest.mark.parametrize("policy", FORCED)
def test_forced_plans_equal_step_by_step_with_fewer_calls(session, policy):
    a = assets()
    for video in (a.video, a.long):
        ref = session.classify(video, policy=policy, topk=6, appearance_batch=1)
        got = session.classify(video, policy=policy, topk=6)
        assert_tolerance_equal(got, ref)
        plan_a, plan_m = parse_policy(policy).plan(STEPS)
        want = appearance_calls(plan_a, plan_m, DEFAULT_APPEARANCE_BATCH)
        assert got["stats"]["engine_calls"]["appearance_backbone"] == want
        assert got["stats"]["appearance_batches"] == want
        assert ref["stats"]["engine_calls"]["appearance_backbone"] == ref["usage"]["appearance"]
        assert ref["stats"]["appearance_batches"] == 0
        if policy == "rates:1,0":
            assert want == 2  # 16 steps, 8 per call
        if policy == "dense":
            assert want == STEPS  # motion on every step: one step per call
        else:
            assert want < got["usage"]["appearance"]
    assert decode_threads() == []


@pytest.mark.parametrize("size", [2, 3, 5, 16])
def test_calls_follow_the_size(onnx_session, size):
    rec = onnx_session.classify(assets().long, policy="rates:0.5,0.125", appearance_batch=size)
    plan_a, plan_m = parse_policy("rates:0.5,0.125").plan(STEPS)
    assert rec["stats"]["engine_calls"]["appearance_backbone"] == appearance_calls(
        plan_a, plan_m, size)


def test_the_decoder_walks_the_same_frames_and_seeks_no_more(onnx_session):
    """Chunks stop at motion steps: the decoder sees the same reads in the same order.

    Without the read-ahead thread every decoder counter is deterministic: all equal.
    The long video has a keyframe every second, and the plans seek."""
    a = assets()
    seeks = 0
    for policy in ("rates:0.5,0.125", "every:2,4", "rates:1,0"):
        base = onnx_session.options(policy=policy)
        for decode in (DecodeOptions(read_ahead=0), DecodeOptions(read_ahead=0, skip_nonref=False),
                       DecodeOptions()):
            stats = []
            for k in (1, DEFAULT_APPEARANCE_BATCH):
                (rec,) = list(onnx_session.classify_many(
                    [a.long], options=replace(base, decode=decode, appearance_batch=k)))
                stats.append(rec["stats"])
            ref, got = stats
            assert got["appearance_batches"] > 0
            keys = ("seeks",) if decode.read_ahead is None else ("seeks", *TIMED)
            for key in keys:
                assert got[key] == ref[key], (policy, decode, key)
            seeks += got["seeks"]
    assert seeks > 0


# -------------------------------------------------------------- lockstep, N = 3


@pytest.mark.parametrize("policy", ["rates:1,0", "rates:0.5,0.125", "every:2,4"])
def test_lockstep_batches_equal_step_by_step(session, policy):
    """One call per chunk for the whole batch: appearance_batch // 3 steps per video."""
    a = assets()
    videos = [a.video, a.long, a.silent]  # the silent one runs the forced plan as asked
    ref = list(session.classify_many(videos, policy=policy, topk=6, batch_size=3,
                                     appearance_batch=1))
    plan_a, plan_m = parse_policy(policy).plan(STEPS)
    for size in (DEFAULT_APPEARANCE_BATCH, 3 * STEPS):
        got = list(session.classify_many(videos, policy=policy, topk=6, batch_size=3,
                                         appearance_batch=size))
        want = appearance_calls(plan_a, plan_m, size // 3)
        for g, r in zip(got, ref, strict=True):
            assert_tolerance_equal(g, r)
            assert g["stats"]["batch"] == 3
            assert g["stats"]["engine_calls"]["appearance_backbone"] == want
            assert g["stats"]["appearance_batches"] == want
        assert want < got[0]["usage"]["appearance"]
    assert ref[2]["has_audio"] is False


def test_a_batch_larger_than_appearance_batch_runs_step_by_step(onnx_session):
    a = assets()
    videos = [a.video, a.long, a.video]
    got = list(onnx_session.classify_many(videos, policy="rates:1,0", batch_size=3,
                                          appearance_batch=5))  # 5 // 3 = 1 step per video
    ref = list(onnx_session.classify_many(videos, policy="rates:1,0", batch_size=3,
                                          appearance_batch=1))
    for g, r in zip(got, ref, strict=True):
        assert_bit_identical(g, r)
        assert g["stats"]["appearance_batches"] == 0


# ------------------------------------------- gates, budgets: the step-by-step path


@pytest.mark.parametrize("policy", ["learned", "dense-appearance"])
def test_gated_plans_are_bit_identical(session, policy):
    a = assets()
    for video in (a.video, a.long):
        ref = session.classify(video, policy=policy, topk=6, appearance_batch=1)
        got = session.classify(video, policy=policy, topk=6)
        assert_bit_identical(got, ref)
        assert got["stats"]["appearance_batches"] == 0
        assert got["stats"]["engine_calls"]["appearance_backbone"] == got["usage"]["appearance"]


def test_mixed_batches_are_bit_identical_and_forced_fallbacks_batch(onnx_session):
    """A learned batch with a silent video whose no-audio policy is forced holds GATE
    plans: step by step, bit for bit. A batch of silent videos under that forced
    no-audio policy knows its plans: batched."""
    a = assets()
    kw = {"policy": "learned", "no_audio_policy": "rates:1,0", "topk": 6}
    mixed = [a.video, a.silent]
    ref = list(onnx_session.classify_many(mixed, batch_size=2, appearance_batch=1, **kw))
    got = list(onnx_session.classify_many(mixed, batch_size=2, **kw))
    assert got[1]["fallback"] == "no_audio"
    for g, r in zip(got, ref, strict=True):
        assert_bit_identical(g, r)
        assert g["stats"]["appearance_batches"] == 0
    ref = onnx_session.classify(a.silent, appearance_batch=1, **kw)
    got = onnx_session.classify(a.silent, **kw)
    assert got["fallback"] == "no_audio" and got["usage"]["appearance"] == STEPS
    assert_tolerance_equal(got, ref)
    assert got["stats"]["engine_calls"]["appearance_backbone"] == 2
    assert got["stats"]["engine_calls"]["appearance_gate"] == 0


@pytest.mark.parametrize("budget_steps", [2, 5])
def test_budgets_keep_the_step_by_step_path(session, budget_steps):
    """Under a budget no work may run ahead (a veto can cancel a planned step): the
    records are bit-identical, the calls equal the usage, the early stop is unchanged."""
    budget = dense_cost(session.engine_set.costs, budget_steps) * 1.001
    for policy in ("rates:1,0", "dense"):
        ref = session.classify(assets().long, policy=policy, budget=budget, appearance_batch=1)
        got = session.classify(assets().long, policy=policy, budget=budget)
        assert_bit_identical(got, ref)
        st = got["stats"]
        assert st["appearance_batches"] == 0
        assert st["engine_calls"]["appearance_backbone"] == got["usage"]["appearance"]
    assert got["steps"] < got["T"]  # dense stops early


# ------------------------------------------------------------ online, early close


def test_online_predictions_stay_per_step(onnx_session):
    a = assets()
    runs = {}
    for k in (1, DEFAULT_APPEARANCE_BATCH):
        runs[k] = list(onnx_session.classify_many([a.long], policy="rates:0.5,0.125",
                                                  online=True, topk=6, appearance_batch=k))
    ref, got = runs[1], runs[DEFAULT_APPEARANCE_BATCH]
    assert len(got) == len(ref) == STEPS + 1
    for g, r in zip(got, ref, strict=True):
        assert g.get("partial") == r.get("partial")
        assert g["decisions"] == r["decisions"] and g["steps"] == r["steps"]
        p, q = probs(g), probs(r)
        assert max(abs(p[c] - q[c]) for c in p) <= 1e-5
    assert got[-1]["stats"]["prediction_reads"] == STEPS
    # the first partial already counts the first chunk's frames (computed ahead)
    first = got[0]["stats"]
    assert first["appearance_batches"] == 1
    assert first["appearance_frames"] > got[0]["usage"]["appearance"]


def test_closing_an_online_run_early_stops_its_decoder(onnx_session):
    it = onnx_session.classify_many([assets().long], policy="rates:1,0", online=True)
    first = next(it)
    assert first["partial"] and first["stats"]["appearance_batches"] == 1
    it.close()
    assert decode_threads() == []


# --------------------------------------------------------------------------- errors


def test_a_decode_error_mid_run_gives_the_same_outcome(onnx_session, tmp_path):
    """Video packets of the long video's second half overwritten (audio intact): the
    frame decoder fails mid-run, inside a chunk; the same error record, the other videos
    of the batch rerun and classified, no decode thread left."""
    import av

    src = assets().long
    data = bytearray(src.read_bytes())
    with av.open(str(src)) as c:
        packets = [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size]
    rng = np.random.default_rng(0)
    for pos, size in packets[90:120]:
        data[pos + 4:pos + size] = rng.integers(0, 256, size - 4, dtype=np.uint8).tobytes()
    bad = tmp_path / "damaged.mp4"
    bad.write_bytes(bytes(data))
    videos = [assets().video, bad, assets().long]
    out = {k: list(onnx_session.classify_many(videos, policy="rates:1,0", batch_size=3,
                                              topk=6, appearance_batch=k))
           for k in (1, DEFAULT_APPEARANCE_BATCH)}
    got, ref = out[DEFAULT_APPEARANCE_BATCH], out[1]
    assert "cannot decode" in ref[1]["error"]
    assert got[1] == ref[1]
    for i in (0, 2):
        assert_tolerance_equal(got[i], ref[i])
        assert got[i]["stats"]["batch"] == 1  # rerun one by one after the batch failed
        assert got[i]["stats"]["appearance_batches"] == 2
    assert decode_threads() == []


def test_bad_appearance_batch_is_one_clear_error(onnx_session):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="appearance_batch must be an integer >= 1"):
            onnx_session.options(appearance_batch=bad)


def test_the_decoder_reads_ahead_a_chunk_when_frames_run_ahead(onnx_session):
    """Twice a chunk's steps of frames may be decoded ahead (next chunk while this one
    runs); two steps otherwise; always capped in bytes."""
    from hms_deploy.runtime.appearance_ahead import read_ahead_steps
    from hms_deploy.runtime.frames import READ_AHEAD_BYTES, open_video

    opts = onnx_session.options(policy="rates:0.5,0.125")
    assert read_ahead_steps(opts, 1) == 2 * DEFAULT_APPEARANCE_BATCH
    assert read_ahead_steps(opts, 3) == 2 * (DEFAULT_APPEARANCE_BATCH // 3)
    assert read_ahead_steps(opts, DEFAULT_APPEARANCE_BATCH) == 2  # one step per video per call
    assert read_ahead_steps(replace(opts, appearance_batch=1), 1) == 2
    assert read_ahead_steps(onnx_session.options(policy="learned"), 1) == 2
    assert read_ahead_steps(onnx_session.options(policy="dense", budget=1e6), 1) == 2
    cfg = onnx_session.engine_set.config
    sizes = {}
    for k in (2, 16, 10_000):
        inputs = open_video(assets().long, cfg, STEPS, steps_ahead=k)
        sizes[k] = inputs.source.options.read_ahead
        frame_bytes = inputs.info.width * inputs.info.height * 3 // 2
        inputs.close()
    assert sizes[2] < sizes[16] < sizes[10_000] == READ_AHEAD_BYTES // frame_bytes

"""The runtime that really skips: equal to the masked forward, counts, profiler, budgets.

Runs on every available backend: ``torch`` (checkpoint), ``onnx`` (hms-export dir) and
``trt-emulated`` (the TensorRT backend over tests/trt_emulator.py, on the CPU).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from helpers import appearance_calls
from runtime_helpers import (  # noqa: F401 - one_torch_thread is an autouse fixture
    STEPS,
    assets,
    decoded_inputs,
    load_model,
    one_torch_thread,
    raw_features,
)
from torch.profiler import ProfilerActivity, profile

from hms_deploy.costs import dense_cost, step_costs, video_cost
from hms_deploy.errors import ConfigError
from hms_deploy.runtime.engine import Engine
from hms_deploy.runtime.options import DEFAULT_APPEARANCE_BATCH
from hms_deploy.runtime.policy import parse_policy
from hms_deploy.runtime.session import Session

BACKENDS = [
    "torch",
    "onnx",
    "trt-emulated",
    pytest.param("torch-cuda", marks=pytest.mark.gpu),
    pytest.param("onnx-cuda", marks=pytest.mark.gpu),
    pytest.param("trt", marks=pytest.mark.tensorrt),
]
POLICIES = ["learned", "dense", "audio-only", "every:3,6", "rates:0.5,0.25"]


def _open(backend: str) -> Session:
    """``torch``/``onnx`` on the CPU; ``*-cuda`` and ``trt`` on a GPU (skipped without one)."""
    a = assets()
    if backend == "trt-emulated":
        from runtime_helpers import emulated_export_dir
        from trt_emulator import emulated_tensorrt

        return Session(engines_dir=emulated_export_dir(), engine="trt", device="cpu",
                       streams=emulated_tensorrt().emulated_device).open()
    engine, _, cuda = backend.partition("-")
    device = "cuda" if cuda or engine == "trt" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if engine == "trt":
        pytest.importorskip("tensorrt")
    if engine == "onnx" and device == "cuda":
        ort = pytest.importorskip("onnxruntime")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("needs onnxruntime-gpu")
    if engine == "torch":
        return Session(checkpoint=a.checkpoint, device=device).open()
    return Session(engines_dir=a.engines, engine=engine, device=device).open()


@pytest.fixture(scope="module", params=BACKENDS)
def session(request):
    with contextlib.ExitStack() as stack:
        if request.param == "trt-emulated":
            from trt_emulator import installed

            stack.enter_context(installed())
        s = _open(request.param)
        yield s
        s.close()


@pytest.fixture(scope="module")
def torch_session():
    s = _open("torch")
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference():
    """Masked PyTorch forward (tau=None) on the same decoded inputs, torch encoders."""
    a = assets()
    model = load_model(a.checkpoint)
    with torch.no_grad():
        feats = raw_features(model, decoded_inputs(a.video, model.cfg, STEPS))
        out = model.masked_forward(feats)
    return {
        "appearance": out.appearance[0].int().tolist(),
        "motion": out.motion[0].int().tolist(),
        "probs": torch.softmax(out.logits[0], 0),
    }


def _probs(rec, labels) -> torch.Tensor:
    d = dict(map(tuple, rec["topk"]))
    return torch.tensor([d[label] for label in labels])


# --------------------------------------------------------------------------- equality


def test_runtime_equals_masked_forward(session, reference):
    rec = session.classify(assets().video, topk=6)
    assert rec["decisions"] == {"appearance": reference["appearance"], "motion": reference["motion"]}
    a, m = reference["appearance"], reference["motion"]
    assert 0 < sum(a) < STEPS and 0 < sum(m) < sum(a)  # decisions are mixed
    torch.testing.assert_close(_probs(rec, session.labels), reference["probs"], rtol=0, atol=1e-4)
    assert rec["label"] == session.labels[int(reference["probs"].argmax())]


def test_onnx_equals_torch():
    a = assets()
    with _open("torch") as t, _open("onnx") as o:
        for policy in ("learned", "dense"):
            rt = t.classify(a.video, policy=policy, topk=6)
            ro = o.classify(a.video, policy=policy, topk=6)
            assert rt["decisions"] == ro["decisions"]
            assert rt["label"] == ro["label"]
            torch.testing.assert_close(_probs(ro, o.labels), _probs(rt, t.labels), rtol=0, atol=1e-4)
            assert ro["gflops"]["used"] == pytest.approx(rt["gflops"]["used"], rel=1e-6)


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("policy", POLICIES)
def test_engine_calls_equal_inputs_equal_usage(session, policy):
    rec = session.classify(assets().video, policy=policy)
    st, calls, use, dec = rec["stats"], rec["stats"]["engine_calls"], rec["usage"], rec["decisions"]
    T = rec["steps"]
    assert T == STEPS
    assert use == {"appearance": sum(dec["appearance"]), "motion": sum(dec["motion"])}
    assert st["appearance_frames"] == use["appearance"]
    assert calls["motion_backbone"] == st["motion_clips"] == use["motion"]
    assert calls["appearance_cell"] == use["appearance"]
    assert calls["motion_cell"] == use["motion"]
    assert calls["audio_cell"] == T and calls["head"] == 1
    assert all(m <= a for a, m in zip(dec["appearance"], dec["motion"]))  # hierarchy
    if policy == "learned":
        assert calls["appearance_gate"] == T
        assert calls["motion_gate"] == use["appearance"]  # only where appearance ran
        assert st["host_reads"] == T + use["appearance"]  # one read per gate evaluated
        assert calls["appearance_backbone"] == use["appearance"]  # step by step
        assert st["appearance_batches"] == 0
    else:
        plan_a, plan_m = parse_policy(policy).plan(T)
        assert dec == {"appearance": plan_a.tolist(), "motion": plan_m.tolist()}
        assert calls["appearance_gate"] == calls["motion_gate"] == st["host_reads"] == 0
        # the plan is known in advance: several steps' frames per call (appearance_ahead.py)
        want = appearance_calls(plan_a, plan_m, DEFAULT_APPEARANCE_BATCH)
        assert calls["appearance_backbone"] == st["appearance_batches"] == want
        if policy == "every:3,6":
            assert want == 4 < use["appearance"] == 6  # steps 0 | 3 6 | 9 12 | 15 (motion: 0 6 12)
    if policy == "audio-only":
        assert st["frames_decoded"] == st["frames_converted"] == 0
        assert calls["appearance_backbone"] == calls["motion_backbone"] == 0
    costs = session.engine_set.costs
    assert rec["gflops"]["used"] == pytest.approx(
        video_cost(costs, steps=T, appearance=use["appearance"], motion=use["motion"]), rel=1e-9
    )
    assert rec["gflops"]["dense"] == pytest.approx(dense_cost(costs, T), rel=1e-9)


def _conv_counts(fn) -> dict[str, int]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return {op: names.count(op) for op in ("aten::conv2d", "aten::conv3d")}


@pytest.mark.parametrize("policy", ["audio-only", "learned"])
def test_torch_profiler_shows_no_backbone_op_on_skipped_steps(torch_session, policy):
    es = torch_session.engine_set
    model = {p: e.module for p, e in es.engines.items()}
    a = assets()
    x = decoded_inputs(a.video, es.config, STEPS)
    with torch.inference_mode():
        per_audio = _conv_counts(lambda: model["audio_backbone"](x["mel"][:1]))
        per_frame = _conv_counts(lambda: model["appearance_backbone"](x["frame"][:1]))
        per_clip = _conv_counts(lambda: model["motion_backbone"](x["clip"][:1]))
    assert per_clip["aten::conv3d"] > 0 and per_frame["aten::conv2d"] > 0
    holder = {}
    counts = _conv_counts(lambda: holder.setdefault("rec", torch_session.classify(a.video, policy=policy)))
    rec = holder["rec"]
    audio_calls = rec["stats"]["engine_calls"]["audio_backbone"]
    use = rec["usage"]
    assert counts["aten::conv3d"] == use["motion"] * per_clip["aten::conv3d"]
    assert counts["aten::conv2d"] == (
        audio_calls * per_audio["aten::conv2d"] + use["appearance"] * per_frame["aten::conv2d"]
    )
    if policy == "audio-only":
        assert counts["aten::conv3d"] == 0


# ----------------------------------------------------------------------------- budget


def _simulate_dense(costs, budget, T):
    """The budget rule of docs/method.md §5 for the dense policy, step by step."""
    s = step_costs(costs)
    used, a, m = 0.0, [], []
    for _ in range(T):
        if used + s["base"] + s["head"] > budget:
            break
        used += s["base"]
        ai = mi = 0
        if used + s["appearance"] + s["head"] <= budget:
            used += s["appearance"]
            ai = 1
            if used + s["motion"] + s["head"] <= budget:
                used += s["motion"]
                mi = 1
        a.append(ai)
        m.append(mi)
    return a, m


BUDGET_STEPS = 8  # dense costs ~1.3 GMAC at 8 steps of the tiny model


def _budgets(costs):
    s = step_costs(costs)
    one = s["base"] + s["head"]
    return [one, one + s["appearance"] * 1.5, 0.1, 0.5, 100.0]


@pytest.mark.parametrize("policy", ["dense", "learned"])
def test_budget_is_respected(session, policy):
    costs = session.engine_set.costs
    s = step_costs(costs)
    T = BUDGET_STEPS
    free = session.classify(assets().video, policy=policy, steps=T)
    for budget in _budgets(costs):
        rec = session.classify(assets().video, policy=policy, budget=budget, steps=T)
        steps, dec, use = rec["steps"], rec["decisions"], rec["usage"]
        used = rec["gflops"]["used"]
        assert rec["budget"] == budget
        assert 1 <= steps <= T
        assert len(dec["appearance"]) == len(dec["motion"]) == steps
        assert used <= budget * (1 + 1e-9)
        assert used == pytest.approx(
            video_cost(costs, steps=steps, appearance=use["appearance"], motion=use["motion"]),
            rel=1e-9,
        )
        if steps < T:  # stopped because the next step's base did not fit
            assert used + s["base"] > budget
        assert rec["stats"]["engine_calls"]["audio_backbone"] >= 1
        assert rec["stats"]["engine_calls"]["audio_cell"] == steps  # no audio work wasted
        if policy == "dense":
            assert (dec["appearance"], dec["motion"]) == _simulate_dense(costs, budget, T)
        vetoed = rec["stats"]["vetoed"]
        if vetoed["appearance"] == vetoed["motion"] == 0:
            # nothing refused: the same decisions as without a budget, cut at `steps`
            assert dec["appearance"] == free["decisions"]["appearance"][:steps]
            assert dec["motion"] == free["decisions"]["motion"][:steps]
    assert rec["decisions"] == free["decisions"] and rec["steps"] == T  # budget 100 > dense


def test_budget_too_small_for_one_step(session):
    s = step_costs(session.engine_set.costs)
    with pytest.raises(ConfigError, match=r"budget .* GMAC cannot afford one step \(base"):
        session.classify(assets().video, budget=(s["base"] + s["head"]) * 0.99)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="budget must be a number of GMAC > 0"):
            session.classify(assets().video, budget=bad)


# ------------------------------------------------------------------- online and lockstep


def test_online_yields_partials_then_final(torch_session):
    v = assets().video
    recs = list(torch_session.classify_many([v], online=True, topk=6))
    partial, final = recs[:-1], recs[-1]
    assert [r["steps"] for r in partial] == list(range(1, STEPS + 1))
    assert all(r["partial"] is True for r in partial) and "partial" not in final
    offline = torch_session.classify(v, topk=6)
    assert final["decisions"] == offline["decisions"]
    labels = torch_session.labels
    torch.testing.assert_close(_probs(final, labels), _probs(offline, labels), rtol=0, atol=1e-6)
    assert final["topk"] == partial[-1]["topk"]
    costs = torch_session.engine_set.costs
    assert final["gflops"]["used"] == pytest.approx(video_cost(
        costs, steps=STEPS, appearance=final["usage"]["appearance"],
        motion=final["usage"]["motion"], predictions=STEPS), rel=1e-9)
    assert final["stats"]["prediction_reads"] == STEPS
    # online under a budget: the per-step head is paid for as well
    b = 0.3
    rec = torch_session.classify(v, online=True, budget=b)
    assert rec["gflops"]["used"] <= b * (1 + 1e-9)


@pytest.mark.parametrize("budget", [None, 0.3])
def test_partial_engine_calls_are_cumulative_with_the_audio_path_ahead(torch_session, budget):
    """stats.engine_calls counts what ran so far; the audio path runs ahead (audio_steps)."""
    recs = list(torch_session.classify_many([assets().video], online=True, budget=budget))
    for r in recs[:-1]:
        st, calls = r["stats"], r["stats"]["engine_calls"]
        assert calls["audio_cell"] == st["audio_steps"] >= r["steps"]
        assert calls["appearance_backbone"] == r["usage"]["appearance"]
        assert calls["motion_backbone"] == r["usage"]["motion"]
        assert calls["head"] == r["steps"]
    first = recs[0]["stats"]["audio_steps"]
    if budget is None:
        assert first == STEPS  # all T steps' audio before step 0's gate
    else:
        assert first < STEPS  # in chunks that are sure to fit


@pytest.mark.parametrize("budget", [None, 0.3])
def test_lockstep_batch_equals_single_videos(session, budget):
    a = assets()
    videos = [a.video, a.long, a.silent]
    single = [session.classify(v, budget=budget, topk=6) for v in videos]
    batched = list(session.classify_many(videos, budget=budget, topk=6, batch_size=3))
    assert [r["video"] for r in batched] == [str(v) for v in videos]
    for s, b in zip(single, batched):
        assert "error" not in b
        assert b["stats"]["batch"] == 3
        assert b["decisions"] == s["decisions"] and b["steps"] == s["steps"]
        assert b["label"] == s["label"]
        torch.testing.assert_close(
            _probs(b, session.labels), _probs(s, session.labels), rtol=0, atol=1e-5
        )
        assert b["gflops"]["used"] == pytest.approx(s["gflops"]["used"], rel=1e-9)


class _Seen(Engine):
    """An open engine that keeps a host copy of every input batch it is called with."""

    def __init__(self, inner: Engine):
        super().__init__(inner.spec, inner.device)
        self.inner, self.inputs = inner, []

    def open(self) -> None:
        assert self.inner.is_open

    def close(self) -> None:
        pass

    def run(self, inputs, n):
        self.inputs.append({k: v.to("cpu", copy=True) for k, v in inputs.items()})
        return self.inner(inputs)


@pytest.mark.parametrize("budget", [None, 0.3])
def test_lockstep_calls_each_backbone_once_per_step_with_the_rows_that_fired(session, budget):
    """Compaction: on every step where at least one video's gate fired, each backbone runs
    exactly once, on exactly the inputs of the videos whose gate fired (in batch order)."""
    from hms_deploy.runtime.frames import VideoInputs

    a = assets()
    videos = [a.video, a.long, a.silent]
    engines = session.engine_set.engines
    seen = {m: _Seen(engines[f"{m}_backbone"]) for m in ("appearance", "motion")}
    saved = dict(engines)
    try:
        for m, e in seen.items():
            engines[f"{m}_backbone"] = e.__enter__()
        recs = list(session.classify_many(videos, budget=budget, batch_size=3))
    finally:
        engines.update(saved)
    assert all("error" not in r for r in recs)
    T = max(r["steps"] for r in recs)
    diverged = False
    for m, key, read in (("appearance", "frame", VideoInputs.appearance),
                         ("motion", "clip", VideoInputs.motion)):
        fired = [[v for v, r in enumerate(recs) if t < r["steps"] and r["decisions"][m][t]]
                 for t in range(T)]
        steps_fired = [(t, rows) for t, rows in enumerate(fired) if rows]
        active = [sum(t < r["steps"] for r in recs) for t in range(T)]
        diverged |= any(0 < len(rows) < active[t] for t, rows in enumerate(fired))
        calls = seen[m].inputs
        assert len(calls) == len(steps_fired), (m, len(calls), steps_fired)
        inputs = [VideoInputs(v, session.engine_set.config, STEPS) for v in videos]
        for (t, rows), x in zip(steps_fired, calls):
            want = torch.from_numpy(np.stack([read(inputs[v], t) for v in rows]))
            assert torch.equal(x[key], want), (m, t, rows)
        for vi in inputs:
            vi.close()
    assert diverged, "the batch's decisions never diverged: the test proves nothing"


# ----------------------------------------------------------------------------- decode


def test_decode_on_demand_is_one_forward_pass(torch_session):
    from hms_deploy.data.video import probe

    a = assets()
    rec = torch_session.classify(a.long, policy="dense")
    st = rec["stats"]
    n = probe(a.long).num_frames
    assert st["seeks"] == 0  # motion clips reach back into the decoded window, no seek
    assert st["frames_decoded"] <= n
    # the plain decoder (no read-ahead thread, whose RGB of planned frames the cache reuses)
    # serves the look-backs from the window of decoded frames
    from dataclasses import replace

    from hms_deploy.runtime.frames import DecodeOptions

    plain = replace(torch_session.options(policy="dense"), decode=DecodeOptions(0, False))
    (rec,) = list(torch_session.classify_many([a.long], options=plain))
    assert rec["stats"]["seeks"] == 0 and rec["stats"]["window_hits"] > 0
    rec = torch_session.classify(a.long, policy="audio-only")
    assert rec["stats"]["frames_decoded"] == 0


def test_video_without_audio(session):
    rec = session.classify(assets().silent)
    assert rec["has_audio"] is False and rec["steps"] == STEPS


def test_steps_override(session):
    rec = session.classify(assets().video, steps=5, policy="dense")
    assert rec["T"] == rec["steps"] == 5
    assert rec["gflops"]["dense"] == pytest.approx(dense_cost(session.engine_set.costs, 5))
    with pytest.raises(ConfigError, match="steps must be an integer >= 1, got 0"):
        session.classify(assets().video, steps=0)

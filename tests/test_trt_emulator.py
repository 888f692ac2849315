"""The TensorRT path on CPU through tests/trt_emulator.py (an emulator, not TensorRT).

- The emulator itself: launches are deferred (outputs are poison until the stream is
  synchronised), a launch whose memory is not kept alive or whose context is gone fails,
  memory only the emulator held is poisoned, TensorRT 11 mode lacks the removed names.
- The real backend against it: a backend that forgot to order the caller after the
  engines' stream, or to record its inputs, fails here (negative controls); the real one
  passes (and the conformance matrix and the scheduler's Session tests run it as
  ``trt-emulated``).
- The real plan builder (export/tensorrt.py ``build_plan``) against its builder and ONNX
  parser under TensorRT 10.x and 11.x, parser errors, plans refused across versions, and
  the first-use plan cache of ``trt_engines``.
- Session records over ``trt-emulated`` equal ONNX Runtime's (learned, forced, budget,
  lockstep, online).
"""

from __future__ import annotations

import contextlib
import gc
import shutil
from pathlib import Path

import pytest
import torch
from engine_assets import emulated_export_dir, export_dir, specs, torch_engine
from trt_emulator import EmulatorError, emulated_tensorrt, installed

from hms_deploy.errors import EngineError, ExportError
from hms_deploy.parts import PART_NAMES, random_inputs
from hms_deploy.runtime.backends.trt import TrtEngine, trt_engines
from hms_deploy.runtime.trt_plan import DEFAULT_MAX_BATCH

pytest.importorskip("onnxruntime")

CPU = torch.device("cpu")


@pytest.fixture
def trt():
    with installed() as module:
        yield module


def _engine(part: str, cls: type[TrtEngine] = TrtEngine, root: Path | None = None,
            version: str = "11.0.0") -> TrtEngine:
    device = emulated_tensorrt(version).emulated_device
    root = root or emulated_export_dir()
    return cls(specs()[part], root / f"{part}.plan", CPU, stream=device.new_stream(CPU), streams=device)


def _reference(part: str, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch_engine(part) as ref:
        return {k: v.clone() for k, v in ref(x).items()}


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for k, w in want.items():
        assert got[k].dtype == w.dtype, k
        torch.testing.assert_close(got[k], w, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------- the emulator


def _raw_launch(trt, part: str, n: int = 2):
    """A context with bound inputs/outputs and one launch enqueued (no backend code)."""
    device = trt.emulated_device
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine((emulated_export_dir() / f"{part}.plan").read_bytes())
    ctx = engine.create_execution_context()
    spec = specs()[part]
    x = random_inputs(spec, n, seed=5)
    outs = {t.name: torch.empty(t.with_batch(n), dtype=torch.float32) for t in spec.outputs}
    for name, t in (*x.items(), *outs.items()):
        assert ctx.set_input_shape(name, t.shape) if name in x else True
        assert ctx.set_tensor_address(name, t.data_ptr())
    stream = device.new_stream(CPU)
    device.record([*x.values(), *outs.values()], stream)
    assert ctx.execute_async_v3(stream.cuda_stream)
    return ctx, stream, x, outs


def test_launches_run_only_when_the_stream_is_synchronised(trt):
    _ctx, stream, x, outs = _raw_launch(trt, "head")
    assert len(stream.pending) == 1
    assert torch.isnan(outs["probs"]).all()  # a read before the sync sees poison
    stream.synchronize()
    assert not stream.pending
    _close(outs, _reference("head", x))


def test_unrecorded_or_destroyed_memory_fails_the_launch(trt):
    device = trt.emulated_device
    ctx, stream, x, outs = _raw_launch(trt, "head")
    stream.kept.clear()  # as if nothing had been recorded: the input may be freed already
    with pytest.raises(EmulatorError, match=r"^head: launch uses 'h' at .*no live tensor recorded"):
        stream.synchronize()
    ctx, stream, x, outs = _raw_launch(trt, "head")
    del ctx
    gc.collect()
    with pytest.raises(EmulatorError, match="^head: execution context destroyed while its launch was pending"):
        stream.synchronize()
    ctx, stream, x, outs = _raw_launch(trt, "head")
    with pytest.raises(EmulatorError, match="unknown stream 0x0"):
        ctx.execute_async_v3(0)  # the legacy default stream
    device.synchronize()
    _close(outs, _reference("head", x))


def test_memory_only_the_emulator_held_is_poisoned(trt):
    device = trt.emulated_device
    stream = device.new_stream(CPU)
    kept_by_caller = torch.ones(8)
    device.record([kept_by_caller, torch.ones(8)], stream)
    before = device.poisoned
    stream.synchronize()
    assert device.poisoned == before + 1  # the temporary, not the caller's tensor
    assert torch.equal(kept_by_caller, torch.ones(8))


def test_tensorrt_11_lacks_the_names_it_removed():
    t10, t11 = emulated_tensorrt("10.13.0.35"), emulated_tensorrt("11.0.0")
    for name in ("FP16", "BF16", "INT8", "FP8", "OBEY_PRECISION_CONSTRAINTS"):
        assert hasattr(t10.BuilderFlag, name) and not hasattr(t11.BuilderFlag, name)
    assert hasattr(t11.BuilderFlag, "TF32")
    assert hasattr(t10.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    assert not hasattr(t11.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    b10, b11 = (t.Builder(t.Logger()) for t in (t10, t11))
    assert b10.platform_has_fast_fp16 and not hasattr(b11, "platform_has_fast_fp16")
    assert hasattr(b10.create_builder_config(), "int8_calibrator")
    assert not hasattr(b11.create_builder_config(), "int8_calibrator")
    for name in ("device_memory_size", "create_execution_context_without_device_memory"):
        assert hasattr(t10.ICudaEngine, name) and not hasattr(t11.ICudaEngine, name)
    assert hasattr(t10.IExecutionContext, "all_shape_inputs_specified")
    assert not hasattr(t11.IExecutionContext, "all_shape_inputs_specified")
    assert b11.create_network(0).strongly_typed and not b10.create_network(0).strongly_typed


# ------------------------------------------------------- the backend against the emulator


class _NoWait(TrtEngine):
    """A bug on purpose: the caller's stream is not ordered after the engines' stream."""

    @contextlib.contextmanager
    def _ordered(self):
        yield self.stream


def test_a_backend_that_skips_the_wait_reads_poison(trt):
    x = random_inputs(specs()["appearance_cell"], 3, seed=2)
    want = _reference("appearance_cell", x)
    with _engine("appearance_cell", _NoWait) as engine:
        out = engine(x)
        assert torch.isnan(out["h_next"]).all()  # what a GPU read before the sync may see
        engine.stream.synchronize()
        _close(out, want)
    with _engine("appearance_cell") as engine:  # the real backend orders the caller
        _close(engine(x), want)


def test_a_backend_that_does_not_record_its_inputs_fails(trt, monkeypatch):
    device = trt.emulated_device
    x = random_inputs(specs()["head"], 2, seed=3)
    strided = {"h": torch.stack([x["h"], -x["h"]], dim=2).flatten(1)[:, ::2]}  # copied by bindable
    with _engine("head") as engine:
        engine(strided)
        monkeypatch.setattr(device, "record", lambda tensors, stream: None)
        engine._buffers.clear()  # new outputs, which now nobody records either
        with pytest.raises(EmulatorError, match="no live tensor recorded on its stream"):
            engine(strided)
        monkeypatch.undo()
    device.synchronize()


def test_chunks_above_the_profile_are_deferred_and_ordered(trt):
    x = random_inputs(specs()["audio_cell"], DEFAULT_MAX_BATCH + 3, seed=4)  # plans: N <= max
    device = trt.emulated_device
    with _engine("audio_cell") as engine:
        launches = device.launches
        out = engine(x)
        assert device.launches == launches + 2 and device.pending() == 0
    _close(out, _reference("audio_cell", x))


# ----------------------------------------------------------------- building plans


@pytest.mark.parametrize("version", ["10.13.0.35", "11.0.0"])
def test_build_plan_runs_on_tensorrt_10_and_11(tmp_path, version):
    from hms_deploy.export.tensorrt import BuildOptions, build_plan

    part = "appearance_gate"
    m_onnx = export_dir() / f"{part}.onnx"
    with installed(version):
        meta = build_plan(m_onnx, specs()[part], tmp_path / f"{part}.plan", BuildOptions(max_batch=4),
                          onnx_sha256="x", timing_cache=tmp_path / "trt_timing.cache")
        assert meta["tensorrt_version"] == version and meta["max_batch"] == 4
        # what the builder did: TensorRT 11 types every network strongly, 10.x only on request
        eleven = version.startswith("11")
        assert meta["strongly_typed"] is eleven
        assert meta["flags"] == (["STRONGLY_TYPED", "no TF32"] if eleven else ["no TF32"])
        assert meta["io_dtypes"]["decision"] == "INT64"
        assert (tmp_path / "trt_timing.cache").read_bytes().startswith(b"TRT-EMULATOR-TIMING")
        x = random_inputs(specs()[part], 3, seed=1)
        with _engine(part, root=tmp_path, version=version) as engine:
            _close(engine(x), _reference(part, x))


def test_build_plan_reports_parser_errors(tmp_path, trt):
    from hms_deploy.export.tensorrt import BuildOptions, build_plan

    bad = tmp_path / "head.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ExportError, match=r"^head: TensorRT cannot parse head.onnx: \? \(\?\): cannot read ONNX"):
        build_plan(bad, specs()["head"], tmp_path / "head.plan", BuildOptions(), onnx_sha256="x")


def test_a_plan_from_another_tensorrt_version_is_refused(tmp_path):
    from hms_deploy.export.tensorrt import BuildOptions, build_plan

    with installed("10.13.0.35"):
        build_plan(export_dir() / "head.onnx", specs()["head"], tmp_path / "head.plan", BuildOptions(),
                   onnx_sha256="x")
    refused = pytest.raises(EngineError, match=r"^head: TensorRT 11.0.0 cannot load head.plan")
    with installed("11.0.0"), refused, _engine("head", root=tmp_path):
        pass


def test_first_use_builds_plans_once_and_caches_them(tmp_path, trt):
    from trt_emulator import add_plans

    from hms_deploy.runtime.manifest import load_manifest

    root = tmp_path / "engines"
    shutil.copytree(export_dir(), root)
    builds = []

    def build(export, *, max_batch):
        builds.append(max_batch)
        return add_plans(export, max_batch=max_batch)

    # ``build`` stands in for hms-export's add_trt_plans, minus its CUDA parity run
    device = trt.emulated_device
    m = load_manifest(root)
    engines = trt_engines(m, CPU, streams=device, max_batch=4, build_plans=build)
    assert builds == [4] and m.has("trt") and (root / "trt_timing.cache").is_file()
    trt_engines(load_manifest(root), CPU, streams=device, build_plans=build)
    assert builds == [4]  # cached in the export dir
    x = random_inputs(specs()["motion_gate"], 2, seed=0)
    with engines["motion_gate"] as gate:
        assert gate.max_batch == 4
        _close(gate(x), _reference("motion_gate", x))
    assert set(PART_NAMES) <= {p.stem for p in root.glob("*.plan")}


# ------------------------------------------------------------------ Session records


def _same(a: dict, b: dict) -> None:
    skip = {"engine", "export", "timing_ms", "topk", "score", "stats"}
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
    assert a["score"] == pytest.approx(b["score"], abs=1e-5)
    assert [k for k, _ in a["topk"]] == [k for k, _ in b["topk"]]
    assert [p for _, p in a["topk"]] == pytest.approx([p for _, p in b["topk"]], abs=1e-5)
    # the decoder's counters depend on how far the read-ahead thread ran before a seek
    # (timing), not on the engines: compare the engine-side stats
    decoder = {"frames_decoded", "frames_converted", "seeks", "window_hits", "frames_walked",
               "frames_skipped"}
    assert ({k: v for k, v in a["stats"].items() if k not in decoder}
            == {k: v for k, v in b["stats"].items() if k not in decoder})


MODES = {
    "learned": {},
    "dense": {"policy": "dense"},
    "forced-every": {"policy": "every:3,6"},
    "budget": {"budget": 0.3},
    "online": {"online": True},
    "lockstep": {"batch_size": 3},
}


@pytest.fixture(scope="module")
def sessions():
    from runtime_helpers import assets
    from runtime_helpers import emulated_export_dir as runtime_emulated

    from hms_deploy.runtime import Session

    with installed() as trt, Session(engines_dir=assets().engines) as onnx, \
            Session(engines_dir=runtime_emulated(), engine="trt", streams=trt.emulated_device) as emu:
        yield onnx, emu


@pytest.mark.parametrize("mode", MODES, ids=[f"trt-emulated-{m}" for m in MODES])
def test_session_records_equal_onnx(sessions, mode):
    from runtime_helpers import assets

    onnx, emu = sessions
    a = assets()
    videos = [a.video, a.long, a.silent]
    device = emulated_tensorrt().emulated_device
    waits = device.waits
    got = list(emu.classify_many(videos, **MODES[mode]))
    # the GPU's path: the scheduler made the engines' stream current, so no engine waited
    # for another stream and launches stayed pending until stream-ordered work needed them
    assert device.waits == waits
    want = list(onnx.classify_many(videos, **MODES[mode]))
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert "error" not in g, g
        assert g["engine"] == "trt" and w["engine"] == "onnx"
        _same(g, w)

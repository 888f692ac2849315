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
import json
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


# ------------------------------------------------- the backend's binding sequence


def test_every_part_runs_through_the_binding_sequence(trt):
    for part in PART_NAMES:
        if part == "motion_backbone":
            continue  # slow on the CPU; the same code path as the other backbones
        x1, x3 = (random_inputs(specs()[part], n, seed=n) for n in (1, 3))
        engine = _engine(part)
        with engine:
            assert engine.max_batch == DEFAULT_MAX_BATCH
            _close(engine(x1), _reference(part, x1))
            _close(engine(x3), _reference(part, x3))
        assert engine._context is None and engine._engine is None and engine._runtime is None


def _with_io_dtype(src: Path, dst: Path, name: str, dtype: str) -> Path:
    """A copy of the emulated plan ``src`` whose header declares ``name`` as ``dtype`` (what a
    TensorRT 10 build that is not strongly typed may do with an INT64 output)."""
    from trt_emulator import MAGIC

    data = src.read_bytes()
    n = int.from_bytes(data[len(MAGIC):len(MAGIC) + 8], "little")
    header = json.loads(data[len(MAGIC) + 8:len(MAGIC) + 8 + n])
    for t in header["io"]:
        if t["name"] == name:
            t["dtype"] = dtype
    h = json.dumps(header).encode()
    dst.write_bytes(MAGIC + len(h).to_bytes(8, "little") + h + data[len(MAGIC) + 8 + n:])
    return dst


def test_decision_dtype_is_read_from_the_plan_and_cast_to_int64(tmp_path, trt):
    _with_io_dtype(emulated_export_dir() / "motion_gate.plan", tmp_path / "motion_gate.plan",
                   "decision", "INT32")
    x = random_inputs(specs()["motion_gate"], 3, seed=0)
    with _engine("motion_gate", root=tmp_path) as engine:
        out = engine(x)
        assert engine._out_dtypes["decision"] == torch.int32  # what the plan declares
    assert out["decision"].dtype == torch.int64 and out["decision"].shape == (3,)
    _close(out, _reference("motion_gate", x))


def test_shapes_and_addresses_are_set_only_when_they_change(trt):
    spec = specs()["appearance_cell"]
    x = random_inputs(spec, 2, seed=1)
    with _engine("appearance_cell") as engine:
        first = engine(x)
        kept = {k: v.clone() for k, v in first.items()}
        log = engine._context.log
        assert [e for e in log if e[0] == "shape"] == [("shape", (t.name, (2, *t.shape))) for t in spec.inputs]
        del log[:]
        engine(x)  # same N, same input tensors, same output buffers: nothing to set
        assert log == [("launch", engine.stream.cuda_stream)]
        del log[:]
        again = engine({**x, "h": first["h_next"], "c": first["c_next"]})  # fed its own outputs
        assert [e for e in log if e[0] == "shape"] == []
        assert {e[1] for e in log if e[0] == "address"} == {"h", "c", "h_next", "c_next"}
        assert again["h_next"].data_ptr() != first["h_next"].data_ptr()  # second buffer set
        for k, v in kept.items():
            assert torch.equal(first[k], v), f"{k} was overwritten while it was an input"
        _close(again, _reference("appearance_cell", {**x, "h": kept["h_next"], "c": kept["c_next"]}))
        assert engine._buffers is not None and engine._buffers.allocations == 2


def test_non_contiguous_inputs_are_copied_and_held(trt):
    x = random_inputs(specs()["head"], 3, seed=4)
    strided = {"h": torch.stack([x["h"], -x["h"]], dim=2).flatten(1)[:, ::2]}
    assert not strided["h"].is_contiguous()
    with _engine("head") as engine:
        out = engine(strided)
        held = engine._held
        assert len(held) == 1 and held[0].is_contiguous() and torch.equal(held[0], x["h"])
    _close(out, _reference("head", x))


def test_unloadable_or_mismatched_plans_say_how_to_rebuild(tmp_path, trt):
    device = trt.emulated_device

    def engine(plan: Path, **kw: object) -> TrtEngine:
        return TrtEngine(specs()["head"], plan, CPU, stream=device.new_stream(CPU), streams=device, **kw)

    (tmp_path / "head.plan").write_bytes(b"garbage")
    broken = engine(tmp_path / "head.plan", export_dir=tmp_path)
    with pytest.raises(EngineError, match=r"^head: TensorRT 11.0.0 cannot load head.plan .*"
                       r"rebuild with `hms_deploy.export.add_trt_plans\('.*'\)`"), broken:
        pass
    assert broken._context is None
    shutil.copy(emulated_export_dir() / "audio_cell.plan", tmp_path / "x.plan")
    with pytest.raises(EngineError, match=r"^head: plan x.plan has inputs \['x_a', 'h', 'c'\] .*expected \['h'\]"), \
            engine(tmp_path / "x.plan"):
        pass
    with pytest.raises(EngineError, match=r"^head: TensorRT plan .*none.plan not found"), \
            engine(tmp_path / "none.plan"):
        pass


def _plans_built_elsewhere(tmp_path: Path, **meta: str) -> Path:
    """A copy of the emulated export whose manifest says its plans were built with ``meta``
    (``tensorrt_version``, ``compute_capability``)."""
    from hms_deploy.runtime import manifest as mf

    root = tmp_path / "engines"
    shutil.copytree(emulated_export_dir(), root)
    data = json.loads((root / "manifest.json").read_text())
    for rec in data["parts"].values():
        rec["trt"].update(meta)
    data = {k: v for k, v in data.items() if k not in ("format", "format_version")}
    mf.write_manifest(root, data)
    return root


@pytest.mark.parametrize(("meta", "why"), [
    ({"tensorrt_version": "10.0.1"}, r"plan built for TensorRT 10.0.1 .*this machine has TensorRT 11.0.0"),
    ({"compute_capability": "8.6"}, r"\(sm_86\); this machine has TensorRT 11.0.0 on GPU .* \(sm_90\)"),
])
def test_trt_engines_refuse_plans_built_elsewhere(tmp_path, trt, meta, why):
    from hms_deploy.cli.common import flag_advice
    from hms_deploy.runtime.manifest import load_manifest

    m = load_manifest(_plans_built_elsewhere(tmp_path, **meta))
    with pytest.raises(EngineError, match=rf"^audio_backbone: .*{why}.*: rebuild with "
                       r"`hms_deploy.export.add_trt_plans\('.*'\)` \(and 8 more parts\)") as e:
        trt_engines(m, CPU, streams=trt.emulated_device)
    assert flag_advice(e.value, {}).endswith(  # the CLI shows the command, not the call
        f": rebuild with `hms-export --engines {m.dir} --engine trt` (and 8 more parts)")


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

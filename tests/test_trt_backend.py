"""The TensorRT backend without TensorRT: errors, a fake TensorRT on CPU, and mypy.

- Without TensorRT (or without CUDA) the backend raises BackendUnavailable with the hint.
- A fake ``tensorrt`` module whose execution context reads its inputs from and writes
  its outputs to the raw addresses it was given (CPU memory, through ctypes) drives
  :class:`TrtEngine` through the real call sequence: plan I/O discovery and checks,
  dtypes read from the plan (an INT32 ``decision`` is cast to int64), input shapes set
  only when N changes, addresses rebound only when they change, batches above the
  profile's maximum in chunks, output buffers reused per N and never aliasing inputs.
  The CUDA-only steps (streams, ``record_stream``) are not run here (the emulator,
  tests/test_trt_emulator.py, runs them with deferred execution).
- mypy checks runtime/backends/trt.py against the TensorRT stubs (patched so that mypy
  can read them, tests/trt_stubs.py), with a negative control proving it does.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from engine_assets import export_dir, specs, torch_engine, trt_unavailable_reason

from hms_deploy.cli.common import flag_advice
from hms_deploy.errors import BackendUnavailable, EngineError
from hms_deploy.parts import PART_NAMES, PartSpec, random_inputs
from hms_deploy.runtime.backends import trt as trt_backend
from hms_deploy.runtime.backends.trt import TRT_MISSING, TrtEngine, require_cuda, trt_engines

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


# --------------------------------------------------------------------- without TensorRT


def test_without_tensorrt_the_backend_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine_assets import manifest

    stubs_only = types.ModuleType("tensorrt")  # what tensorrt-stubs' namespace package looks like
    stubs_only.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", stubs_only)
    with pytest.raises(BackendUnavailable, match=r"^TensorRT is not installed: pip install tensorrt "
                       r"\(NVIDIA's index\) on a machine with an NVIDIA GPU$"):
        trt_engines(manifest(), torch.device("cuda", 0))
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailable) as e:
        trt_engines(manifest(), torch.device("cuda", 0))
    assert str(e.value) == TRT_MISSING


def test_tensorrt_needs_a_cuda_device() -> None:
    with pytest.raises(BackendUnavailable, match=r"TensorRT runs on an NVIDIA GPU; got device cpu"):
        require_cuda(CPU)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="torch sees no CUDA device"):
            require_cuda(torch.device("cuda"))


def test_conformance_variant_reports_why_tensorrt_is_skipped() -> None:
    reason = trt_unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and CUDA are available: the conformance test runs the real backend")
    assert "TensorRT" in reason or "CUDA" in reason


# ----------------------------------------------------------------- a fake TensorRT on CPU


class _DataType:
    def __init__(self, name: str):
        self.name = name


_TRT_NAMES = {torch.float32: "FLOAT", torch.uint8: "UINT8", torch.int64: "INT64", torch.int32: "INT32"}


def _tensor_at(ptr: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The CPU memory at ``ptr`` as a tensor (what TensorRT does with a bound address)."""
    n = 1
    for d in shape:
        n *= d
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=dtype).view(shape)


class _Context:
    def __init__(self, engine: _Engine):
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.log: list[tuple[str, object]] = []

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.log.append(("shape", (name, tuple(shape))))
        n = shape[0]
        if not 1 <= n <= self.engine.max_batch:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        n = next(iter(self.shapes.values()))[0]
        return (n, *self.engine.spec_of(name).shape)

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.log.append(("address", name))
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        self.log.append(("launch", stream))
        spec = self.engine.spec
        n = next(iter(self.shapes.values()))[0]
        xs = [_tensor_at(self.addresses[t.name], (n, *t.shape), self.engine.dtypes[t.name]).clone()
              for t in spec.inputs]
        with torch.inference_mode():
            out = self.engine.module(*xs)
        outs = out if isinstance(out, tuple) else (out,)
        for t, y in zip(spec.outputs, outs):
            dst = _tensor_at(self.addresses[t.name], (n, *t.shape), self.engine.dtypes[t.name])
            dst.copy_(y.to(dst.dtype))
        return True


class _Engine:
    def __init__(self, spec: PartSpec, module: torch.nn.Module, dtypes: dict[str, torch.dtype], max_batch: int):
        self.spec, self.module, self.dtypes, self.max_batch = spec, module, dtypes, max_batch
        self.names = [t.name for t in (*spec.inputs, *spec.outputs)]
        self.contexts: list[_Context] = []

    def spec_of(self, name: str):
        return next(t for t in (*self.spec.inputs, *self.spec.outputs) if t.name == name)

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name in self.spec.input_names else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> _DataType:
        return _DataType(_TRT_NAMES[self.dtypes[name]])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (-1, *self.spec_of(name).shape)

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        t = self.spec_of(name)
        return [t.with_batch(1), t.with_batch(1), t.with_batch(self.max_batch)]

    def create_execution_context(self) -> _Context:
        ctx = _Context(self)
        self.contexts.append(ctx)
        return ctx


def fake_tensorrt(max_batch: int = 4, decision: torch.dtype = torch.int64) -> types.ModuleType:
    """A ``tensorrt`` module whose plans are ``b"fake:<part>"`` files run by torch modules."""
    from engine_assets import model

    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch._dynamo looks it up
    trt.__version__ = "10.13.0.35"
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.engines = []

    class Logger:
        WARNING = 2

        def __init__(self, severity: int):
            self.severity = severity

    class Runtime:
        def __init__(self, logger: Logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data: bytes) -> _Engine | None:
            if not data.startswith(b"fake:"):
                return None
            part = data[5:].decode()
            spec = specs()[part]
            dtypes = {t.name: {"float32": torch.float32, "uint8": torch.uint8, "int64": decision}[t.dtype]
                      for t in (*spec.inputs, *spec.outputs)}
            engine = _Engine(spec, model().part(part), dtypes, max_batch)
            trt.engines.append(engine)
            return engine

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


class _Stream:
    cuda_stream = 12345

    def synchronize(self) -> None:
        pass


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch):
    """Install a fake TensorRT; engines may then run on CPU (the CUDA-only steps are skipped)."""
    def install(**kw: object) -> types.ModuleType:
        trt = fake_tensorrt(**kw)  # type: ignore[arg-type]
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(trt_backend, "_LOGGER", None)
        return trt
    monkeypatch.setattr(trt_backend, "require_cuda", lambda device: device)
    return install


def _plan(tmp_path: Path, part: str, data: bytes | None = None) -> Path:
    path = tmp_path / f"{part}.plan"
    path.write_bytes(data if data is not None else f"fake:{part}".encode())
    return path


def _engine(tmp_path: Path, part: str) -> TrtEngine:
    return TrtEngine(specs()[part], _plan(tmp_path, part), CPU, stream=_Stream())  # type: ignore[arg-type]


def _reference(part: str, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch_engine(part) as ref:
        return {k: v.clone() for k, v in ref(x).items()}


def _close(part: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype, f"{part}.{k}"
        torch.testing.assert_close(got[k], w, rtol=1e-5, atol=1e-6)


def test_fake_plan_runs_every_part_through_the_binding_sequence(tmp_path: Path, fake_trt) -> None:
    fake_trt(max_batch=4)
    for part in PART_NAMES:
        if part == "motion_backbone":
            continue  # slow in eager torch; same code path as the other backbones
        engine = _engine(tmp_path, part)
        x1, x3 = (random_inputs(specs()[part], n, seed=n) for n in (1, 3))
        with engine:
            assert engine.max_batch == 4
            _close(part, engine(x1), _reference(part, x1))
            _close(part, engine(x3), _reference(part, x3))
        assert engine._context is None and engine._engine is None and engine._runtime is None


def test_decision_dtype_is_read_from_the_plan_and_cast_to_int64(tmp_path: Path, fake_trt) -> None:
    trt = fake_trt(decision=torch.int32)
    x = random_inputs(specs()["motion_gate"], 3, seed=0)
    with _engine(tmp_path, "motion_gate") as engine:
        out = engine(x)
        assert engine._out_dtypes["decision"] == torch.int32  # what the plan declares
    assert out["decision"].dtype == torch.int64 and out["decision"].shape == (3,)
    _close("motion_gate", out, _reference("motion_gate", x))
    assert trt.engines[-1].dtypes["decision"] == torch.int32


def test_shapes_and_addresses_are_set_only_when_they_change(tmp_path: Path, fake_trt) -> None:
    trt = fake_trt()
    spec = specs()["appearance_cell"]
    x = random_inputs(spec, 2, seed=1)
    with _engine(tmp_path, "appearance_cell") as engine:
        first = engine(x)
        kept = {k: v.clone() for k, v in first.items()}
        log = trt.engines[-1].contexts[-1].log
        assert [e for e in log if e[0] == "shape"] == [("shape", (t.name, (2, *t.shape))) for t in spec.inputs]
        del log[:]
        engine(x)  # same N, same input tensors, same output buffers: nothing to set
        assert log == [("launch", _Stream.cuda_stream)]
        del log[:]
        again = engine({**x, "h": first["h_next"], "c": first["c_next"]})  # fed its own outputs
        assert [e for e in log if e[0] == "shape"] == []
        assert {e[1] for e in log if e[0] == "address"} == {"h", "c", "h_next", "c_next"}
        assert again["h_next"].data_ptr() != first["h_next"].data_ptr()  # second buffer set
        for k, v in kept.items():
            assert torch.equal(first[k], v), f"{k} was overwritten while it was an input"
        _close("appearance_cell", again, _reference("appearance_cell", {**x, "h": kept["h_next"], "c": kept["c_next"]}))
        assert engine._buffers is not None and engine._buffers.allocations == 2


def test_batches_above_the_profile_run_in_chunks(tmp_path: Path, fake_trt) -> None:
    trt = fake_trt(max_batch=2)
    x = random_inputs(specs()["audio_cell"], 5, seed=2)
    with _engine(tmp_path, "audio_cell") as engine:
        out = engine(x)
        launches = [e for e in trt.engines[-1].contexts[-1].log if e[0] == "launch"]
    assert len(launches) == 3 and out["h_next"].shape == (5, 32)
    _close("audio_cell", out, _reference("audio_cell", x))


def test_non_contiguous_inputs_are_copied_and_held(tmp_path: Path, fake_trt) -> None:
    fake_trt()
    x = random_inputs(specs()["head"], 3, seed=4)
    strided = {"h": torch.stack([x["h"], -x["h"]], dim=2).flatten(1)[:, ::2]}
    assert not strided["h"].is_contiguous()
    with _engine(tmp_path, "head") as engine:
        out = engine(strided)
        held = engine._held
        assert len(held) == 1 and held[0].is_contiguous() and torch.equal(held[0], x["h"])
    _close("head", out, _reference("head", x))


def test_unloadable_or_mismatched_plans_say_how_to_rebuild(tmp_path: Path, fake_trt) -> None:
    fake_trt()
    broken = TrtEngine(specs()["head"], _plan(tmp_path, "head", b"garbage"), CPU, stream=_Stream(),  # type: ignore[arg-type]
                       export_dir=tmp_path)
    with pytest.raises(EngineError, match=r"^head: TensorRT 10.13.0.35 cannot load head.plan .*"
                       r"rebuild with `hms_deploy.export.add_trt_plans\('.*'\)`"), broken:
        pass
    assert broken._context is None
    other_part = TrtEngine(specs()["head"], _plan(tmp_path, "x", b"fake:audio_cell"), CPU, stream=_Stream())  # type: ignore[arg-type]
    with pytest.raises(EngineError, match=r"^head: plan x.plan has inputs \['x_a', 'h', 'c'\] .*expected \['h'\]"), \
            other_part:
        pass
    missing = TrtEngine(specs()["head"], tmp_path / "none.plan", CPU, stream=_Stream())  # type: ignore[arg-type]
    with pytest.raises(EngineError, match=r"^head: TensorRT plan .*none.plan not found"), missing:
        pass


# ------------------------------------------------------------- trt_engines over a manifest


def _export_with_plans(tmp_path: Path, *, version: str = "10.13.0.35", cc: str = "9.0") -> Path:
    """A copy of the test export whose manifest lists (fake) plans built for ``version``/``cc``."""
    import shutil

    from hms_deploy.runtime import manifest as mf
    from hms_deploy.runtime.trt_plan import plan_metadata

    root = tmp_path / "engines"
    shutil.copytree(export_dir(), root)
    data = json.loads((root / "manifest.json").read_text())
    for name in PART_NAMES:
        plan = _plan(root, name)
        rec = data["parts"][name]
        rec["files"]["trt"] = plan.name
        rec["sha256"]["trt"] = mf.sha256_file(plan)
        rec["trt"] = plan_metadata(
            spec=specs()[name], plan_file=plan.name, onnx_sha256=rec["sha256"]["onnx"],
            tensorrt_version=version, gpu_name="Fake GPU", compute_capability=cc, max_batch=4,
            opt_batch=2, workspace_bytes=1 << 20, precision="fp32", flags=[], strongly_typed=False,
        )
    data = {k: v for k, v in data.items() if k not in ("format", "format_version")}
    mf.write_manifest(root, data)
    return root


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch, fake_trt):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    return fake_trt


def test_trt_engines_load_compatible_plans(tmp_path: Path, fake_gpu) -> None:
    from hms_deploy.runtime.manifest import load_manifest

    fake_gpu()
    m = load_manifest(_export_with_plans(tmp_path))
    engines = trt_engines(m, CPU, stream=_Stream())  # type: ignore[arg-type]
    assert list(engines) == list(PART_NAMES)
    x = random_inputs(specs()["head"], 2, seed=0)
    with engines["head"] as head:
        _close("head", head(x), _reference("head", x))


@pytest.mark.parametrize(("version", "cc", "why"), [
    ("10.0.1", "9.0", r"plan built for TensorRT 10.0.1 .*this machine has TensorRT 10.13.0.35"),
    ("10.13.0.35", "8.6", r"\(sm_86\); this machine has TensorRT 10.13.0.35 on GPU Fake GPU \(sm_90\)"),
])
def test_trt_engines_refuse_plans_built_elsewhere(tmp_path: Path, fake_gpu, version: str, cc: str,
                                                  why: str) -> None:
    from hms_deploy.runtime.manifest import load_manifest

    fake_gpu()
    m = load_manifest(_export_with_plans(tmp_path, version=version, cc=cc))
    with pytest.raises(EngineError, match=rf"^audio_backbone: .*{why}.*: rebuild with "
                       r"`hms_deploy.export.add_trt_plans\('.*'\)` \(and 8 more parts\)") as e:
        trt_engines(m, CPU, stream=_Stream())  # type: ignore[arg-type]
    assert flag_advice(e.value, {}).endswith(  # the CLI shows the command, not the call
        f": rebuild with `hms-export --engines {m.dir} --engine trt` (and 8 more parts)")


def test_trt_engines_build_missing_plans_once(tmp_path: Path, fake_gpu) -> None:
    import shutil

    from hms_deploy.runtime.manifest import load_manifest

    fake_gpu()
    root = tmp_path / "engines"
    shutil.copytree(export_dir(), root)
    with_plans = _export_with_plans(tmp_path / "built")
    builds = []

    def fake_add_trt_plans(export: Path, *, max_batch: int):
        builds.append((Path(export), max_batch))
        for f in with_plans.iterdir():
            shutil.copy(f, root / f.name)
        return load_manifest(root)

    m = load_manifest(root)
    old_sha = m.sha256
    with pytest.raises(EngineError, match="the export has no TensorRT plans: rebuild with"):
        trt_engines(m, CPU, stream=_Stream())  # type: ignore[arg-type]
    engines = trt_engines(m, CPU, stream=_Stream(), max_batch=4,  # type: ignore[arg-type]
                          build_plans=fake_add_trt_plans)
    assert builds == [(root, 4)]
    assert m.sha256 != old_sha and m.has("trt")  # the caller's manifest object was refreshed
    assert engines["head"].path == root / "head.plan"
    trt_engines(load_manifest(root), CPU, stream=_Stream())  # type: ignore[arg-type]
    assert len(builds) == 1  # plans cached in the export dir


# ------------------------------------------------------------------------------- mypy


# torch and numpy are not analysed (Any): a cold mypy run over torch takes ~40 s here.
# The full check, torch included, is the command in tests/trt_stubs.py.
MYPY_INI = """\
[mypy]
python_version = 3.11
ignore_missing_imports = True
follow_imports = silent
[mypy-torch.*]
follow_imports = skip
[mypy-numpy.*]
follow_imports = skip
"""


def _mypy(tmp: Path, stubs: Path, *files: str) -> subprocess.CompletedProcess[str]:
    ini = tmp / "mypy.ini"
    ini.write_text(MYPY_INI)
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ini), "--cache-dir", str(tmp / "cache"),
           "--no-error-summary", "--strict", *files]
    env = {**os.environ, "MYPYPATH": str(stubs)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_trt_backend_type_checks_against_the_tensorrt_stubs(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    from trt_stubs import write_stubs

    stubs = write_stubs(tmp_path / "stubs")
    if stubs is None:
        pytest.skip("tensorrt-stubs is not installed")
    done = _mypy(tmp_path, stubs, "runtime/backends/trt.py", "runtime/streams.py")
    assert done.returncode == 0, done.stdout + done.stderr
    # negative control: the stubs are really used (an API TensorRT 10 removed is an error)
    bad = tmp_path / "bad_trt.py"
    bad.write_text("import tensorrt as trt\n\n\ndef f(c: trt.IExecutionContext) -> None:\n"
                   "    c.execute_async_v2([], 0)\n")
    done = _mypy(tmp_path, stubs, str(bad))
    assert done.returncode != 0 and '"IExecutionContext" has no attribute "execute_async_v2"' in done.stdout

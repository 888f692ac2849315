"""The engine contract (runtime/engine.py), one conformance test over every backend.

Every (backend, device) variant available here runs the same checks on each of the nine
parts of a tiny model: output names and order, dtypes (``decision`` int64 (N,)), shapes
at N = 1 and N = 3, values against the torch engine on CPU, call counting, output
lifetime, errors that name the part and the input, use outside ``with``, idempotent
enter/exit and freed resources. Variants that need what this machine lacks (a GPU,
onnxruntime-gpu, TensorRT) are skipped with the reason.
"""

from __future__ import annotations

import functools
import gc
import subprocess
import sys
import weakref

import pytest
import torch
from engine_assets import ATOL, EMULATED_TRT, RTOL, TIE, VARIANTS, make_engine, torch_engine

from hms_deploy.dtypes import TORCH_DTYPES
from hms_deploy.errors import EngineError
from hms_deploy.parts import PART_NAMES, PartSpec, random_inputs
from hms_deploy.runtime.engine import Engine

Tensor = torch.Tensor


def _inputs(spec: PartSpec, n: int, device: torch.device, seed: int) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in random_inputs(spec, n, seed=seed).items()}


def _reference(part: str, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """The torch engine on CPU (the checkpoint's own module)."""
    with torch_engine(part) as ref:
        return {k: v.clone() for k, v in ref({k: v.cpu() for k, v in inputs.items()}).items()}


@functools.cache
def _seeded_reference(part: str, n: int, seed: int) -> dict[str, Tensor]:
    return _reference(part, random_inputs(torch_engine(part).spec, n, seed=seed))


def _assert_matches(part: str, got: dict[str, Tensor], ref: dict[str, Tensor]) -> None:
    """Values within rtol/atol of the reference; atol relative where magnitudes are tiny.

    A gate's decision must agree except where its logits are within :data:`TIE` (a tie
    may fall either way on another backend).
    """
    for name, r in ref.items():
        g = got[name].cpu()
        if name == "decision":
            margin = (ref["logits"][:, 1] - ref["logits"][:, 0]).abs()
            clear = margin > TIE
            assert torch.equal(g[clear], r[clear]), f"{part}: decisions {g.tolist()} != {r.tolist()}"
            continue
        scale = float(r.abs().max())
        atol = ATOL * min(1.0, scale) if scale > 0 else ATOL
        where = f"{part}.{name}"
        torch.testing.assert_close(g, r, rtol=RTOL, atol=atol, msg=lambda m, w=where: f"{w}: {m}")


def _resources(engine: Engine) -> list[object]:
    """What an open engine of this backend holds (all None once closed)."""
    attrs = {
        "torch": ["module"],
        "onnx": ["_session", "_buffers", "_io"],
        "trt": ["_context", "_engine", "_runtime", "_buffers"],
    }[engine.backend]
    return [getattr(engine, a) for a in attrs]


def _bad_inputs(spec: PartSpec, x: dict[str, Tensor]) -> list[tuple[dict[str, Tensor], str]]:
    """(inputs, regex of the error) for a wrong name, shape, dtype and device."""
    first = spec.inputs[0].name
    part = spec.name
    x0 = x[first]
    renamed = {("bogus" if k == first else k): v for k, v in x.items()}
    wider = torch.zeros(*x0.shape[:-1], x0.shape[-1] + 1, dtype=x0.dtype, device=x0.device)
    other = torch.float32 if x0.dtype == torch.uint8 else torch.float64
    elsewhere = torch.device("meta") if x0.device.type == "cpu" else torch.device("cpu")
    return [
        (renamed, rf"^{part}: inputs \[.*\] do not match the part's inputs .*missing \['{first}'\]"),
        ({**x, first: wider}, rf"^{part}: input '{first}' has shape \({', '.join(map(str, wider.shape))}\)"),
        ({**x, first: x0.to(other)}, rf"^{part}: input '{first}' has dtype {other}, expected"),
        ({**x, first: x0.to(elsewhere)}, rf"^{part}: input '{first}' is on {elsewhere.type}"),
    ]


@pytest.fixture(autouse=True)
def _trt_emulator(request: pytest.FixtureRequest):
    """The TensorRT emulator installed for the ``trt-emulated`` variant's tests."""
    params = getattr(request.node, "callspec", None)
    version = EMULATED_TRT.get(params.params.get("variant", "")) if params is not None else None
    if version is None:
        yield None
        return
    from trt_emulator import installed

    with installed(version) as trt:
        yield trt


def _deferred_on_the_callers_stream(engine: Engine, device, part: str, x: dict[str, Tensor]) -> None:
    """The GPU's path under the emulator: the engines' stream is the caller's current one
    (as the scheduler makes it), so a call waits for nothing and its launch stays pending:
    an output read before the stream is synchronised is garbage, after it the values."""
    from trt_emulator import peek

    want = _seeded_reference(part, 3, 3)
    waits, launches = device.waits, device.launches
    with device.use(engine.stream):
        out = engine(x)
        assert device.waits == waits and device.pending() > 0, f"{part}: the launch did not stay pending"
        early = {k: peek(v) for k, v in out.items()}
        engine.stream.synchronize()
    assert device.launches > launches and device.pending() == 0
    for name, y in early.items():  # what a read before the synchronisation sees: poison
        bad = y.isnan().all() if y.is_floating_point() else (y == -1).all()
        assert bad, f"{part}.{name}: readable before the stream was synchronised?"
    _assert_matches(part, out, want)


@pytest.mark.parametrize("part", PART_NAMES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_conforms(variant: str, part: str, _trt_emulator) -> None:
    engine = make_engine(variant, part)
    spec = engine.spec
    dev = engine.device
    x1 = _inputs(spec, 1, dev, seed=1)
    x3 = _inputs(spec, 3, dev, seed=3)

    # not open: refused, not counted
    with pytest.raises(EngineError, match=rf"^{part}: engine used outside its 'with' block"):
        engine(x1)
    assert engine.calls == 0

    assert engine.__enter__() is engine
    assert engine.__enter__() is engine  # entering again is a no-op
    try:
        for n, x, seed in ((1, x1, 1), (3, x3, 3)):
            out = engine(x)
            assert list(out) == spec.output_names
            for t in spec.outputs:
                y = out[t.name]
                assert y.dtype == TORCH_DTYPES[t.dtype], f"{part}.{t.name}: {y.dtype}"
                assert tuple(y.shape) == t.with_batch(n), f"{part}.{t.name}: {tuple(y.shape)}"
                assert y.device.type == dev.type
            _assert_matches(part, out, _seeded_reference(part, n, seed))
        if "decision" in spec.output_names:
            assert out["decision"].dtype == torch.int64 and out["decision"].shape == (3,)
        assert engine.calls == 2

        # lifetime: outputs stay valid across a call with another N ...
        out3 = engine(x3)
        kept = {k: v.clone() for k, v in out3.items()}
        engine(x1)
        for k, v in kept.items():
            assert torch.equal(out3[k], v), f"{part}.{k} changed by a call with another batch size"
        # ... and an engine never writes into its inputs (a cell fed its own outputs)
        if {"h_next", "c_next"} <= set(spec.output_names):
            x_again = {**x3, "h": out3["h_next"], "c": out3["c_next"]}
            expected = _reference(part, x_again)
            _assert_matches(part, engine(x_again), expected)
            for k, v in kept.items():
                assert torch.equal(out3[k], v), f"{part}.{k} overwritten while it was an input"
        calls = engine.calls
        assert calls == 4 + ({"h_next", "c_next"} <= set(spec.output_names))
        if _trt_emulator is not None:
            _deferred_on_the_callers_stream(engine, _trt_emulator.emulated_device, part, x3)
            calls += 1

        # errors name the part and the input, and are not counted
        for bad, pattern in _bad_inputs(spec, x1):
            with pytest.raises(EngineError, match=pattern):
                engine(bad)
        assert engine.calls == calls
    finally:
        held = sum(r is not None for r in _resources(engine))
        session = weakref.ref(engine._session) if engine.backend == "onnx" else None
        engine.__exit__(None, None, None)
        engine.__exit__(None, None, None)  # exiting again is a no-op
    assert held, f"{variant}: an open engine holds no resources?"
    assert [r for r in _resources(engine) if r is not None] == []
    if _trt_emulator is not None:
        device = _trt_emulator.emulated_device
        assert device.pending() == 0, "launches left pending after close()"
        assert device.launches > 0
    if session is not None:
        gc.collect()
        assert session() is None, "the ONNX Runtime session outlived close()"
    with pytest.raises(EngineError, match=rf"^{part}: engine used outside"):
        engine(x1)

    with engine:  # reopens
        _assert_matches(part, engine(x1), _seeded_reference(part, 1, 1))
    assert engine.calls == calls + 1


def test_engine_set_from_export_runs_onnx() -> None:
    """engines_from_export (the EngineSet factory) with the ONNX backend and its options."""
    pytest.importorskip("onnxruntime")
    from engine_assets import export_dir

    from hms_deploy.runtime.engines import open_engine_set

    es = open_engine_set("onnx", engines_dir=export_dir(), device="cpu", threads=1)
    assert es.backend == "onnx" and es.export_sha256 and es.labels == [f"class_{i}" for i in range(5)]
    x = _inputs(es["head"].spec, 2, torch.device("cpu"), seed=0)
    with es:
        _assert_matches("head", es["head"](x), _reference("head", x))
        assert es.calls() == {**{n: 0 for n in PART_NAMES}, "head": 1}
    assert all(not e._open for e in es.engines.values())


def test_importing_the_runtime_does_not_import_backends() -> None:
    code = (
        "import sys, hms_deploy, hms_deploy.runtime.engine, hms_deploy.runtime.engines, "
        "hms_deploy.runtime.bindings, hms_deploy.runtime.backends.onnx, "
        "hms_deploy.runtime.backends.trt, hms_deploy.runtime.backends.torch\n"
        "print(sorted(m for m in ('onnxruntime', 'tensorrt', 'tensorrt_bindings') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

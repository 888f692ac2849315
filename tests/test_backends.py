"""Shared binding logic (runtime/bindings.py) and the ONNX Runtime backend's own behaviour.

The bindings are plain torch and run everywhere; the ONNX Runtime tests use the CPU
build installed here (the CUDA path's provider checks are exercised with a fake module).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_assets import manifest, specs, torch_engine

from hms_deploy.dtypes import NUMPY_DTYPES
from hms_deploy.errors import BackendUnavailable, EngineError
from hms_deploy.parts import random_inputs
from hms_deploy.runtime.bindings import (
    OutputBuffers,
    bindable,
    numpy_dtype,
    overlaps,
    torch_dtype_from_ort,
    torch_dtype_from_trt,
)

CPU = torch.device("cpu")

# ------------------------------------------------------------------------------ dtypes


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16),
     ("INT8", torch.int8), ("INT32", torch.int32), ("INT64", torch.int64),
     ("BOOL", torch.bool), ("UINT8", torch.uint8), ("DataType.INT64", torch.int64)],
)
def test_trt_dtype_names_map_to_torch(name: str, dtype: torch.dtype) -> None:
    assert torch_dtype_from_trt(name, where="x") is dtype


def test_unknown_trt_dtype_names_the_tensor() -> None:
    with pytest.raises(EngineError, match=r"^appearance_gate: output 'decision' has TensorRT dtype FP4"):
        torch_dtype_from_trt("DataType.FP4", where="appearance_gate: output 'decision'")


def test_ort_and_numpy_dtypes() -> None:
    assert torch_dtype_from_ort("tensor(int64)", where="x") is torch.int64
    assert torch_dtype_from_ort("tensor(uint8)", where="x") is torch.uint8
    with pytest.raises(EngineError, match=r"^head: output 'probs' has ONNX type tensor\(string\)"):
        torch_dtype_from_ort("tensor(string)", where="head: output 'probs'")
    for dtype, np_dtype in NUMPY_DTYPES.items():
        assert torch.from_numpy(np.zeros(1, np_dtype)).dtype == dtype
    with pytest.raises(EngineError, match="bfloat16"):
        numpy_dtype(torch.bfloat16, where="x")


# ----------------------------------------------------------------------------- bindable


def test_bindable_passes_contiguous_tensors_through() -> None:
    x = torch.randn(3, 4)
    assert bindable("p", "x", x, device=CPU, dtype=torch.float32) is x


def test_bindable_copies_non_contiguous_input_and_returns_the_copy() -> None:
    base = torch.randn(4, 3)
    x = base.t()  # (3, 4) view, not contiguous
    y = bindable("p", "x", x, device=CPU, dtype=torch.float32)
    assert y.is_contiguous() and torch.equal(y, x)
    assert y.data_ptr() != base.data_ptr()  # a new tensor the caller must hold


def test_bindable_casts_to_the_engine_dtype_and_refuses_another_device() -> None:
    x = torch.arange(6).reshape(2, 3)
    y = bindable("p", "x", x, device=CPU, dtype=torch.int32)
    assert y.dtype == torch.int32 and torch.equal(y.long(), x)
    with pytest.raises(EngineError, match=r"^motion_cell: input 'h' is on meta, expected cpu"):
        bindable("motion_cell", "h", torch.empty(2, 3, device="meta"), device=CPU, dtype=torch.float32)


def test_overlaps_sees_views_of_the_same_storage() -> None:
    a = torch.zeros(4, 8)
    assert overlaps(a, a[1:2]) and overlaps(a[2:], a.t())
    assert not overlaps(a, torch.zeros(4, 8))


# ---------------------------------------------------------------------------- buffers


def _buffers(**kw: int) -> OutputBuffers:
    return OutputBuffers("appearance_gate", {"decision": torch.int64, "logits": torch.float32}, CPU, **kw)


def _shapes(n: int) -> dict[str, tuple[int, ...]]:
    return {"decision": (n,), "logits": (n, 2)}


def test_output_buffers_are_allocated_once_per_shape_and_reused() -> None:
    bufs = _buffers()
    a1 = bufs.get(_shapes(1))
    a3 = bufs.get(_shapes(3))
    assert a1["decision"].dtype == torch.int64 and a3["logits"].shape == (3, 2)
    assert bufs.get(_shapes(1)) is a1 and bufs.get(_shapes(3)) is a3
    assert bufs.allocations == 2 and len(bufs) == 2


def test_output_buffers_never_alias_an_input() -> None:
    bufs = OutputBuffers("cell", {"h_next": torch.float32, "c_next": torch.float32}, CPU)
    shapes = {"h_next": (2, 4), "c_next": (2, 4)}
    a = bufs.get(shapes)
    b = bufs.get(shapes, avoid=[a["h_next"], torch.zeros(2, 4)])  # fed its own output
    assert b is not a and not overlaps(b["h_next"], a["h_next"])
    assert bufs.get(shapes, avoid=[b["c_next"][1:]]) is a  # ping-pong, no new allocation
    assert bufs.get(shapes, avoid=[a["c_next"]]) is b
    assert bufs.allocations == 2
    c = bufs.get(shapes, avoid=[a["h_next"], b["c_next"]])  # both sets are inputs: a third
    assert c is not a and c is not b and bufs.allocations == 3


def test_output_buffers_keep_a_bounded_number_of_shapes() -> None:
    bufs = _buffers(max_shapes=2)
    one = bufs.get(_shapes(1))
    bufs.get(_shapes(2))
    bufs.get(_shapes(1))  # most recently used: kept
    bufs.get(_shapes(3))  # evicts N=2
    assert bufs.get(_shapes(1)) is one
    assert len(bufs) == 2 and bufs.allocations == 3
    bufs.clear()
    assert len(bufs) == 0


def test_output_buffers_refuse_unknown_or_unresolved_shapes() -> None:
    with pytest.raises(EngineError, match=r"^appearance_gate: output 'logits' has unresolved shape \(-1, 2\)"):
        _buffers().get({"decision": (1,), "logits": (-1, 2)})
    with pytest.raises(EngineError, match=r"^appearance_gate: output shapes given for \['logits'\]"):
        _buffers().get({"logits": (1, 2)})


# ------------------------------------------------------------------- ONNX Runtime backend

ort = pytest.importorskip("onnxruntime")

from hms_deploy.runtime.backends import onnx as onnx_backend
from hms_deploy.runtime.backends.onnx import (
    GPU_INSTALL_HINT,
    OnnxEngine,
    check_available,
    onnx_engines,
    resolve_providers,
    trt_profile_options,
)


def test_provider_aliases_and_fallbacks() -> None:
    gpu = torch.device("cuda", 0)
    assert resolve_providers(None, CPU) == ["CPUExecutionProvider"]
    assert resolve_providers(None, gpu) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(["tensorrt"], gpu) == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(EngineError, match=r"providers \['CUDAExecutionProvider'\] need a CUDA device"):
        resolve_providers(["cuda"], CPU)
    with pytest.raises(EngineError, match="needs a GPU provider"):
        resolve_providers(["cpu"], gpu)


def test_missing_cuda_provider_says_to_install_onnxruntime_gpu() -> None:
    fake = types.SimpleNamespace(__version__="1.32.0", get_available_providers=lambda: ["CPUExecutionProvider"])
    with pytest.raises(BackendUnavailable, match=r"no CUDAExecutionProvider .*"
                       + GPU_INSTALL_HINT.replace("-", r"\-").replace("&", r"\&")):
        check_available(fake, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    gpu_build = types.SimpleNamespace(
        __version__="1.32.0", get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    # onnxruntime-gpu's TensorRT provider links TensorRT 10; `pip install tensorrt` brings 11
    with pytest.raises(BackendUnavailable, match=r"TensorrtExecutionProvider.*TensorRT 10's libraries "
                       r"\(libnvinfer\.so\.10\).*tensorrt>=10,<11.*brings TensorRT 11"):
        check_available(gpu_build, ["TensorrtExecutionProvider", "CUDAExecutionProvider"])


def test_cuda_engines_on_the_cpu_build_fail_with_the_install_hint() -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    with pytest.raises(BackendUnavailable, match="pip uninstall -y onnxruntime && pip install onnxruntime-gpu"):
        onnx_engines(manifest(), torch.device("cuda", 0))


def test_missing_onnxruntime_is_backend_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    engine = onnx_engines(manifest(), CPU)["head"]  # construction needs no onnxruntime
    with pytest.raises(BackendUnavailable, match="pip install onnxruntime"), engine:
        pass


def test_trt_ep_profile_covers_every_input() -> None:
    opts = trt_profile_options(specs()["appearance_gate"], 8)
    assert opts == {
        "trt_profile_min_shapes": "x_a:1x32,h:1x64,c:1x64",
        "trt_profile_opt_shapes": "x_a:4x32,h:4x64,c:4x64",
        "trt_profile_max_shapes": "x_a:8x32,h:8x64,c:8x64",
    }


def test_session_io_is_checked_against_the_part(tmp_path) -> None:
    m = manifest()
    wrong = OnnxEngine(specs()["audio_cell"], m.path("head", "onnx"), CPU)
    with pytest.raises(EngineError, match=r"^audio_cell: head.onnx has inputs \['h'\], expected"), wrong:
        pass
    missing = OnnxEngine(specs()["head"], tmp_path / "nope.onnx", CPU)
    with pytest.raises(EngineError, match=r"^head: ONNX file .*nope.onnx not found"), missing:
        pass
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    corrupt = OnnxEngine(specs()["head"], tmp_path / "bad.onnx", CPU)
    with pytest.raises(EngineError, match=r"^head: ONNX Runtime cannot load .*bad.onnx"), corrupt:
        pass


def test_sessions_use_the_requested_threads_and_full_optimisation(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    real = ort.InferenceSession

    def spy(path, sess_options=None, **kw):
        seen.update(threads=sess_options.intra_op_num_threads, level=sess_options.graph_optimization_level,
                    providers=kw["providers"])
        return real(path, sess_options=sess_options, **kw)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    with onnx_engines(manifest(), CPU)["head"]:
        pass
    assert seen == {"threads": onnx_backend.default_threads(),
                    "level": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                    "providers": ["CPUExecutionProvider"]}
    with onnx_engines(manifest(), CPU, threads=1)["head"]:
        pass
    assert seen["threads"] == 1


def test_threads_per_part(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, int] = {}
    real = ort.InferenceSession

    def spy(path, sess_options=None, **kw):
        seen[Path(path).stem] = sess_options.intra_op_num_threads
        return real(path, sess_options=sess_options, **kw)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    engines = onnx_engines(manifest(), CPU, threads={"appearance_backbone": 1, "head": 2})
    for name in ("appearance_backbone", "head", "audio_cell"):
        with engines[name]:
            pass
    assert seen == {"appearance_backbone": 1, "head": 2,
                    "audio_cell": onnx_backend.default_threads()}
    assert onnx_backend.part_threads(3) == dict.fromkeys(onnx_backend.PART_NAMES, 3)
    with pytest.raises(EngineError, match=r"threads: unknown parts \['appearance'\]"):
        onnx_engines(manifest(), CPU, threads={"appearance": 1})
    with pytest.raises(EngineError, match=r"threads must be integers >= 1, got \{'head': 0\}"):
        onnx_engines(manifest(), CPU, threads={"head": 0})


@pytest.mark.parametrize("iobinding", [False, True])
def test_non_contiguous_inputs_are_bound_safely(iobinding: bool) -> None:
    spec = specs()["motion_cell"]
    x = random_inputs(spec, 3, seed=5)
    strided = {k: torch.stack([v, -v], dim=2).flatten(1)[:, ::2] if k == "h" else v for k, v in x.items()}
    assert not strided["h"].is_contiguous() and torch.equal(strided["h"], x["h"])
    with torch_engine("motion_cell") as ref:
        want = {k: v.clone() for k, v in ref(x).items()}
    with onnx_engines(manifest(), CPU, threads=1, iobinding=iobinding)["motion_cell"] as engine:
        got = engine(strided)
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, rtol=1e-4, atol=1e-6)


def test_cpu_outputs_are_fresh_without_iobinding_and_reused_with_it() -> None:
    spec = specs()["head"]
    x = random_inputs(spec, 2, seed=0)
    with onnx_engines(manifest(), CPU, threads=1)["head"] as plain:
        assert plain(x)["probs"].data_ptr() != plain(x)["probs"].data_ptr()
    with onnx_engines(manifest(), CPU, threads=1, iobinding=True)["head"] as bound:
        first = bound(x)["probs"]
        assert bound(x)["probs"].data_ptr() == first.data_ptr()
        assert bound._buffers is not None and bound._buffers.allocations == 1

"""TensorRT logic that needs no TensorRT (profiles, metadata, compatibility, dtypes), and the
plan builder itself where TensorRT and a GPU exist."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from hms_deploy.cli.common import flag_advice
from hms_deploy.config import paper_config, tiny_config
from hms_deploy.errors import BackendUnavailable, ConfigError, EngineError
from hms_deploy.parts import PART_NAMES, part_specs
from hms_deploy.runtime import trt_plan
from hms_deploy.runtime.backends.trt import TRT_MISSING, require_tensorrt
from hms_deploy.runtime.bindings import torch_dtype_from_trt
from hms_deploy.runtime.manifest import PartEntry


def _real_tensorrt():
    """Skip unless the real TensorRT (not only tensorrt-stubs) and a CUDA GPU are present."""
    trt = pytest.importorskip("tensorrt")
    if not hasattr(trt, "Builder"):
        pytest.skip("only tensorrt-stubs is installed (import tensorrt gives an empty namespace)")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    return trt


@pytest.mark.parametrize("variant", ["tiny", "paper"])
def test_profile_shapes_cover_every_input(variant):
    cfg = tiny_config(6) if variant == "tiny" else paper_config(239)
    for name, spec in part_specs(cfg).items():
        prof = trt_plan.profile_shapes(spec, max_batch=8)
        assert list(prof) == spec.input_names, name
        for t in spec.inputs:
            lo, opt, hi = prof[t.name]
            assert lo == (1, *t.shape) and opt == (4, *t.shape) and hi == (8, *t.shape)
    clip = trt_plan.profile_shapes(part_specs(paper_config(5))["motion_backbone"], 2, 1)["clip"]
    assert clip == ((1, 3, 32, 224, 224), (1, 3, 32, 224, 224), (2, 3, 32, 224, 224))


def test_profile_shapes_reject_bad_batches():
    spec = part_specs(tiny_config(6))["head"]
    with pytest.raises(ConfigError, match="max_batch must be >= 1"):
        trt_plan.profile_shapes(spec, 0)
    with pytest.raises(ConfigError, match=r"opt_batch must be in 1\.\.4"):
        trt_plan.profile_shapes(spec, 4, 5)
    assert [trt_plan.default_opt_batch(n) for n in (1, 2, 3, 8, 9)] == [1, 1, 2, 4, 5]


class _FakeDType:
    def __init__(self, name):
        self.name = name


@pytest.mark.parametrize(
    ("trt_name", "dtype"),
    [("FLOAT", torch.float32), ("HALF", torch.float16), ("BF16", torch.bfloat16),
     ("INT8", torch.int8), ("INT32", torch.int32), ("INT64", torch.int64), ("BOOL", torch.bool),
     ("UINT8", torch.uint8)],
)
def test_trt_dtype_map(trt_name, dtype):
    for trt_dtype in (trt_name, f"DataType.{trt_name}", _FakeDType(trt_name)):
        assert torch_dtype_from_trt(trt_plan.trt_dtype_name(trt_dtype), where="x") is dtype


def test_trt_dtype_unknown():
    with pytest.raises(EngineError, match="x has TensorRT dtype INT4, which this runtime cannot"):
        torch_dtype_from_trt(trt_plan.trt_dtype_name(_FakeDType("INT4")), where="x")


def test_one_tensorrt_check_for_the_runtime_and_the_export(monkeypatch: pytest.MonkeyPatch) -> None:
    from hms_deploy.export import tensorrt as export_trt

    stubs_only = types.ModuleType("tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt", stubs_only)
    for check in (require_tensorrt, export_trt.check_available):
        with pytest.raises(BackendUnavailable) as e:
            check()
        assert str(e.value) == TRT_MISSING
    old = types.ModuleType("tensorrt")
    old.Runtime = old.Builder = object  # type: ignore[attr-defined]
    old.__version__ = "8.6.1"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    for check in (require_tensorrt, export_trt.check_available):
        with pytest.raises(BackendUnavailable, match=r"^TensorRT 8\.6\.1 is too old \(10 or newer needed\): pip"):
            check()


@pytest.mark.parametrize("cc", [(8, 9), "8.9", "sm_89", "89", [8, 9]])
def test_parse_cc(cc):
    assert trt_plan.parse_cc(cc) == (8, 9)
    assert trt_plan.sm_name(cc) == "sm_89"
    assert trt_plan.cc_string(cc) == "8.9"


def test_parse_cc_rejects_garbage():
    with pytest.raises(ValueError, match="not a compute capability"):
        trt_plan.parse_cc("ampere")


def _entry(**meta_changes):
    spec = part_specs(tiny_config(6))["motion_gate"]
    meta = trt_plan.plan_metadata(
        spec=spec, plan_file="motion_gate.plan", onnx_sha256="a" * 64, tensorrt_version="10.13.0.35",
        gpu_name="NVIDIA A100-SXM4-80GB", compute_capability=(8, 0), max_batch=8, opt_batch=4,
        workspace_bytes=1 << 30, precision="fp32", flags=["no TF32"], strongly_typed=False,
        build_seconds=1.5, io_dtypes={"x_a": "FLOAT", "decision": "INT64"},
    )
    meta.update(meta_changes)
    return PartEntry(
        name="motion_gate", files={"onnx": "motion_gate.onnx", "trt": "motion_gate.plan"},
        sha256={"onnx": "a" * 64, "trt": "b" * 64}, inputs=list(spec.inputs),
        outputs=list(spec.outputs), gmac=1e-6, trt=meta,
    )


def test_plan_metadata_is_json_and_complete():
    meta = _entry().trt
    assert json.loads(json.dumps(meta)) == meta
    assert meta["compute_capability"] == "8.0"
    assert meta["profile"]["h"] == {"min": [1, 128], "opt": [4, 128], "max": [8, 128]}
    assert set(meta["profile"]) == {"x_a", "x_i", "h", "c"}
    for key in ("tensorrt_version", "gpu", "onnx_sha256", "flags", "workspace_bytes", "precision"):
        assert key in meta


def test_plan_compatible_on_same_machine():
    assert trt_plan.check_plan_compatible(_entry(), "10.13.0.35", (8, 0)) is None
    assert trt_plan.check_plan_compatible(_entry(), "10.13.0.35", "sm_80") is None


def test_plan_incompatible_version_says_how_to_rebuild():
    msg = trt_plan.check_plan_compatible(
        _entry(), "11.0.0.1", (9, 0), gpu_name="NVIDIA H100", export_dir="/srv/engines")
    assert msg is not None
    assert "motion_gate: plan built for TensorRT 10.13.0.35 on GPU NVIDIA A100-SXM4-80GB (sm_80)" in msg
    assert "this machine has TensorRT 11.0.0.1 on GPU NVIDIA H100 (sm_90)" in msg
    assert msg.endswith("rebuild with `hms_deploy.export.add_trt_plans('/srv/engines')`")
    # the library names its call; the CLI shows the command instead
    err = EngineError(msg, remedy=trt_plan.plan_remedy("/srv/engines"))
    assert flag_advice(err, {}).endswith(
        "rebuild with `hms-export --engines /srv/engines --engine trt`")


def test_plan_incompatible_gpu_only():
    msg = trt_plan.check_plan_compatible(_entry(), "10.13.0.35", (8, 6))
    assert msg is not None and "(sm_80)" in msg and "(sm_86)" in msg and "add_trt_plans('DIR')" in msg


def test_plan_built_from_other_onnx():
    msg = trt_plan.check_plan_compatible(_entry(onnx_sha256="c" * 64), "10.13.0.35", (8, 0))
    assert msg is not None and "different ONNX file" in msg


def test_no_plan():
    entry = _entry()
    bare = PartEntry(entry.name, {"onnx": "x.onnx"}, {"onnx": "a" * 64}, entry.inputs,
                     entry.outputs, 1.0)
    msg = trt_plan.check_plan_compatible(bare, "10.13", (8, 0), export_dir="E")
    assert msg == ("motion_gate: no TensorRT plan in the export: build one with "
                   "`hms_deploy.export.add_trt_plans('E')`")
    assert flag_advice(EngineError(msg, remedy=trt_plan.plan_remedy("E")), {}) == (
        "motion_gate: no TensorRT plan in the export: build one with "
        "`hms-export --engines E --engine trt`")
    # the JSON form of an entry works too
    assert trt_plan.check_plan_compatible({"name": "head", "trt": entry.trt, "sha256": entry.sha256},
                                          "10.13.0.35", (8, 0)) is None


def test_tensorrt_missing_is_backend_unavailable():
    try:
        import tensorrt

        if hasattr(tensorrt, "Builder") and torch.cuda.is_available():
            pytest.skip("TensorRT and a GPU are present")
    except ImportError:
        pass
    from hms_deploy.export.tensorrt import check_available

    with pytest.raises(BackendUnavailable, match=r"TensorRT is not installed|needs a CUDA GPU"):
        check_available()


@pytest.mark.tensorrt
def test_build_plan_and_run(tmp_path):
    _real_tensorrt()
    from helpers import call_part

    from hms_deploy.checkpoint import init_checkpoint
    from hms_deploy.export.modules import export_parts
    from hms_deploy.export.onnx import export_part
    from hms_deploy.export.tensorrt import BuildOptions, build_plan
    from hms_deploy.parts import random_inputs
    from hms_deploy.runtime.backends.trt import TrtEngine
    from hms_deploy.runtime.bindings import new_stream
    from hms_deploy.runtime.manifest import sha256_file

    ckpt = init_checkpoint(tiny_config(6))
    parts = export_parts(ckpt.build_model(), ckpt.costs)
    cache = tmp_path / trt_plan.TIMING_CACHE_NAME
    for name in ("audio_backbone", "appearance_gate", "motion_cell"):
        part = parts[name]
        info = export_part(part, tmp_path)
        onnx_path = tmp_path / info.files["onnx"]
        plan = tmp_path / f"{name}.plan"
        meta = build_plan(onnx_path, part.spec, plan, BuildOptions(max_batch=4),
                          onnx_sha256=sha256_file(onnx_path), timing_cache=cache)
        assert plan.is_file() and cache.is_file()
        assert meta["profile"][part.spec.input_names[0]]["max"][0] == 4
        dev = torch.device("cuda")
        engine = TrtEngine(part.spec, plan, dev, stream=new_stream(dev))
        for n in (1, 3):
            x = random_inputs(part.spec, n, seed=n)
            ref = call_part(part.module, part.spec, x)
            with engine:
                got = {k: v.cpu() for k, v in engine({k: v.to(dev) for k, v in x.items()}).items()}
            for out, r in ref.items():
                if r.dtype.is_floating_point:
                    torch.testing.assert_close(got[out].float(), r, rtol=1e-3, atol=1e-4)
                else:
                    assert torch.equal(got[out].to(r.dtype), r)


@pytest.mark.tensorrt
def test_add_trt_plans_to_export(tmp_path):
    _real_tensorrt()
    from hms_deploy.checkpoint import init_checkpoint, save_checkpoint
    from hms_deploy.export.pipeline import ExportOptions, add_trt_plans, export_checkpoint
    from hms_deploy.export.validate import ValidationOptions

    ck = save_checkpoint(init_checkpoint(tiny_config(6)), tmp_path / "ck.pt")
    export_checkpoint(ck, tmp_path / "e", ExportOptions(validation=ValidationOptions(steps=3)))
    man = add_trt_plans(tmp_path / "e", max_batch=4)
    assert man.has("trt") and man.tensorrt["max_batch"] == 4
    assert man.parity["tensorrt"]["status"] == "passed"
    import tensorrt

    cc = torch.cuda.get_device_capability()
    for name in PART_NAMES:
        assert trt_plan.check_plan_compatible(man.parts[name], tensorrt.__version__, cc) is None

"""How TensorRT plans are built, keyed and sized, against tests/trt_emulator.py (an emulator,
not TensorRT) in its TensorRT 10 and 11 modes, and the GPU placement of the Triton model.

- a timing cache TensorRT rejects (made on another GPU) is dropped with a warning and
  replaced, never crashes the build after it;
- the manifest records what the builder did (``strongly_typed``: always on TensorRT 11);
- plans are keyed on TensorRT version + GPU name + compute capability (an H100 plan is
  not used on an H200, both sm_90);
- one profile maximum, large enough for lockstep N = 32, shared by the plans, ONNX
  Runtime's TensorRT provider and hms-export: N = 32 runs as one launch;
- one ``trt.Logger`` per process;
- the Triton model runs on the GPU Triton gives each instance (``KIND_GPU``).
"""

from __future__ import annotations

import pytest
import torch
from engine_assets import emulated_export_dir, export_dir, specs
from trt_emulator import GPU_NAME, emulated_tensorrt, installed

from hms_deploy.parts import random_inputs
from hms_deploy.runtime import trt_plan
from hms_deploy.runtime.backends.trt import TrtEngine

pytest.importorskip("onnxruntime")

CPU = torch.device("cpu")
VERSIONS = ["10.13.0.35", "11.0.0"]


def _build(tmp_path, part: str, precision: str = "fp32", cache=None):
    from hms_deploy.export.tensorrt import BuildOptions, build_plan

    return build_plan(export_dir() / f"{part}.onnx", specs()[part], tmp_path / f"{part}.plan",
                      BuildOptions(max_batch=4, precision=precision), onnx_sha256="x",
                      timing_cache=cache)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_timing_cache_from_another_gpu_is_dropped_with_a_warning(tmp_path, version):
    cache = tmp_path / "trt_timing.cache"
    cache.write_bytes(b"TRT-EMULATOR-TIMING 40\nNVIDIA H100 80GB HBM3\n")  # another card's
    with installed(version):
        with pytest.warns(RuntimeWarning, match="rejected the timing cache .*another GPU"):
            meta = _build(tmp_path, "head", cache=cache)
        assert (tmp_path / "head.plan").is_file() and meta["tensorrt_version"] == version
        # replaced by this GPU's cache, which the next build takes without a warning
        kept = cache.read_bytes()
        assert kept.startswith(b"TRT-EMULATOR-TIMING ") and GPU_NAME.encode() in kept
        with _no_warning():
            _build(tmp_path, "audio_cell", cache=cache)
        assert int(cache.read_bytes().split()[1]) > int(kept.split()[1])


class _no_warning:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error", RuntimeWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_manifest_records_what_the_builder_did(tmp_path, version, precision):
    with installed(version):
        meta = _build(tmp_path, "head", precision=precision)
    # TensorRT 11 ignores the flag and types every network strongly; 10.x when asked (fp16)
    strongly = version.startswith("11") or precision == "fp16"
    assert meta["strongly_typed"] is strongly
    assert ("STRONGLY_TYPED" in meta["flags"]) is strongly
    assert ("no TF32" in meta["flags"]) is (precision == "fp32")


def test_plans_are_keyed_on_the_gpu_name_too():
    entry = {"name": "head", "sha256": {"onnx": "a"}, "trt": trt_plan.plan_metadata(
        spec=specs()["head"], plan_file="head.plan", onnx_sha256="a", tensorrt_version="11.0.0",
        gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0), max_batch=32, opt_batch=16,
        workspace_bytes=1, precision="fp32", flags=[], strongly_typed=True)}
    same = trt_plan.check_plan_compatible(entry, "11.0.0", (9, 0), gpu_name="NVIDIA H100 80GB HBM3")
    assert same is None
    msg = trt_plan.check_plan_compatible(entry, "11.0.0", (9, 0), gpu_name="NVIDIA H200")
    assert msg is not None and "GPU NVIDIA H100 80GB HBM3 (sm_90)" in msg and "NVIDIA H200" in msg
    # the library names its own call; the CLI words the same error as the command to run
    assert "add_trt_plans('DIR')" in msg and "--engine" not in msg
    from hms_deploy.cli.common import flag_advice
    from hms_deploy.errors import EngineError

    advice = flag_advice(EngineError(msg, remedy=trt_plan.plan_remedy()))
    assert "hms-export --engines DIR --engine trt" in advice and "add_trt_plans" not in advice


def test_an_export_for_another_card_of_the_same_capability_is_refused(tmp_path):
    import json
    import shutil

    from hms_deploy.errors import EngineError
    from hms_deploy.runtime import manifest as mf
    from hms_deploy.runtime.backends.trt import trt_engines

    root = tmp_path / "engines"
    shutil.copytree(emulated_export_dir(), root)
    data = json.loads((root / "manifest.json").read_text())
    for rec in data["parts"].values():
        rec["trt"]["gpu"] = "NVIDIA H200"  # same sm_90 as the emulated GPU, another card
    mf.write_manifest(root, {k: v for k, v in data.items() if k not in ("format", "format_version")})
    with installed() as trt, pytest.raises(EngineError, match=r"plan built for .* on GPU NVIDIA H200"):
        trt_engines(mf.load_manifest(root), CPU, streams=trt.emulated_device)


def test_one_profile_maximum_runs_lockstep_n32_in_one_launch():
    import inspect

    from hms_deploy.cli.export import main as hms_export
    from hms_deploy.export.pipeline import ExportOptions
    from hms_deploy.export.tensorrt import BuildOptions
    from hms_deploy.runtime.backends import onnx

    assert trt_plan.DEFAULT_MAX_BATCH >= 32
    assert onnx.DEFAULT_MAX_BATCH == BuildOptions().max_batch == trt_plan.DEFAULT_MAX_BATCH
    assert ExportOptions().max_batch == trt_plan.DEFAULT_MAX_BATCH
    from hms_deploy.runtime.backends.trt import trt_engines

    for factory in (onnx.onnx_engines, trt_engines):
        assert inspect.signature(factory).parameters["max_batch"].default == trt_plan.DEFAULT_MAX_BATCH
    max_batch = next(p for p in hms_export.params if p.name == "max_batch")
    assert max_batch.default is None  # resolved to trt_plan.DEFAULT_MAX_BATCH when run
    x = random_inputs(specs()["motion_cell"], 32, seed=2)
    with installed() as trt:
        device = trt.emulated_device
        engine = TrtEngine(specs()["motion_cell"], emulated_export_dir() / "motion_cell.plan", CPU,
                           stream=device.new_stream(CPU), streams=device)
        with engine:
            launches = device.launches
            engine(x)
            assert engine.max_batch == trt_plan.DEFAULT_MAX_BATCH
            assert device.launches == launches + 1  # one launch, no chunks, no shape switch


def test_one_logger_per_process(tmp_path):
    with installed("11.0.0") as trt:
        before = trt.Logger.created
        for part in ("head", "audio_cell", "appearance_gate"):
            _build(tmp_path, part)
        device = trt.emulated_device
        with TrtEngine(specs()["head"], tmp_path / "head.plan", CPU, stream=device.new_stream(CPU),
                       streams=device) as engine:
            engine(random_inputs(specs()["head"], 2, seed=0))
        assert trt.Logger.created - before == 1
    assert emulated_tensorrt("11.0.0") is trt


def test_the_triton_model_runs_on_the_gpu_triton_gives_it():
    from hms_deploy.runtime.serve.options import RepositoryOptions
    from hms_deploy.runtime.serve.repository import config_pbtxt
    from hms_deploy.runtime.serve.triton_model import instance_device

    assert "kind: KIND_GPU" in config_pbtxt("engines", RepositoryOptions(engine="trt", device="cuda"))
    assert "kind: KIND_CPU" in config_pbtxt("engines", RepositoryOptions(device="cpu"))
    assert instance_device("cuda", "1") == "cuda:1"
    assert instance_device("cuda", None) == "cuda"
    assert instance_device("cuda:0", "1") == "cuda:0"  # an explicit index is kept
    assert instance_device("cpu", "1") == "cpu"

"""manifest.json: round trip, hash verification, path safety, format errors.

These tests use small stand-in files (the manifest does not parse ONNX), so they are fast;
test_export.py covers manifests of real exports.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from hms_deploy.config import tiny_config
from hms_deploy.errors import ManifestError
from hms_deploy.parts import PART_NAMES, part_specs
from hms_deploy.runtime.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    load_manifest,
    part_record,
    preprocessing,
    verify_files,
    write_manifest,
)

CFG = tiny_config(6)
LABELS = [f"class_{i}" for i in range(6)]


def make_export(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    parts = {}
    for i, (name, spec) in enumerate(part_specs(CFG).items()):
        (root / f"{name}.onnx").write_bytes(f"stand-in for {name}\n".encode() * (i + 1))
        parts[name] = part_record(spec, files={"onnx": f"{name}.onnx"}, root=root,
                                  gmac=0.5 + i, precision="fp32", opset=17)
    write_manifest(root, {
        "created": "2025-01-01T00:00:00Z", "precision": "fp32", "T": CFG.steps, "labels": LABELS,
        "cost_unit": "GMAC", "config": CFG.to_dict(), "preprocessing": preprocessing(CFG),
        "producer": {"hms_deploy": "0.1.0", "opset": 17}, "parts": parts, "tensorrt": None,
        "parity": {"status": "passed"},
    })
    return root


def edit(root: Path, fn) -> None:
    path = root / MANIFEST_NAME
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_round_trip(tmp_path):
    root = make_export(tmp_path / "e")
    m = load_manifest(root)
    assert m.config == CFG and m.labels == LABELS and m.steps == CFG.steps
    assert m.data["format_version"] == FORMAT_VERSION and m.precision == "fp32"
    assert list(m.parts) == list(PART_NAMES)
    specs = part_specs(CFG)
    for i, name in enumerate(PART_NAMES):
        e = m.parts[name]
        assert e.spec == specs[name]
        assert e.gmac == 0.5 + i and e.opset == 17 and e.trt is None
        assert m.path(name, "onnx") == (root / f"{name}.onnx").absolute()
        assert e.sha256["onnx"] == hashlib.sha256((root / f"{name}.onnx").read_bytes()).hexdigest()
    assert m.sha256 == hashlib.sha256((root / MANIFEST_NAME).read_bytes()).hexdigest()
    assert m.has("onnx") and not m.has("trt")
    assert m.parity == {"status": "passed"}
    raw = json.loads((root / MANIFEST_NAME).read_text())
    assert raw["parts"]["motion_gate"]["outputs"][0] == {"name": "decision", "shape": ["N"], "dtype": "int64"}
    assert raw["parts"]["appearance_backbone"]["inputs"][0]["shape"] == ["N", 3, 64, 64]
    assert raw["preprocessing"]["appearance"]["mean"] == list(CFG.appearance.mean)
    assert raw["preprocessing"]["motion"]["clip"]["frames"] == 32
    assert raw["preprocessing"]["audio"]["patch_frames"] == 96
    assert not list(root.glob(".*tmp*")), "write_manifest left a temporary file"


def test_path_of_missing_kind(tmp_path):
    m = load_manifest(make_export(tmp_path / "e"))
    with pytest.raises(ManifestError, match=r"part 'head' has no 'trt' file"):
        m.path("head", "trt")
    with pytest.raises(ManifestError, match=r"no part 'tail'"):
        m.path("tail")


def test_tampered_file_is_detected(tmp_path):
    root = make_export(tmp_path / "e")
    (root / "appearance_cell.onnx").write_bytes(b"tampered")
    with pytest.raises(ManifestError, match=r"appearance_cell\.onnx: sha256 mismatch"):
        load_manifest(root)
    m = load_manifest(root, verify=False)
    problems = verify_files(m)
    assert len(problems) == 1 and "appearance_cell.onnx" in problems[0]


def test_missing_file_is_detected(tmp_path):
    root = make_export(tmp_path / "e")
    (root / "head.onnx").unlink()
    with pytest.raises(ManifestError, match=r"head\.onnx: missing \(listed in .*manifest\.json for head\)"):
        load_manifest(root)


@pytest.mark.parametrize(
    ("rel", "match"),
    [
        ("../outside.onnx", r"leaves the export dir"),
        ("sub/../../outside.onnx", r"leaves the export dir"),
        ("/etc/passwd", r"is absolute"),
        ("C:\\models\\head.onnx", r"is absolute"),
        ("\\\\server\\share\\head.onnx", r"is absolute"),
        ("", r"not a plain relative path"),
    ],
)
def test_path_escape_rejected(tmp_path, rel, match):
    root = make_export(tmp_path / "e")
    edit(root, lambda d: d["parts"]["head"]["files"].update(onnx=rel))
    with pytest.raises(ManifestError, match=match):
        load_manifest(root, verify=False)


def test_symlink_escape_rejected(tmp_path):
    root = make_export(tmp_path / "e")
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((root / "head.onnx").read_bytes())
    (root / "head.onnx").unlink()
    (root / "head.onnx").symlink_to(outside)
    with pytest.raises(ManifestError, match=r"resolves outside the export dir"):
        load_manifest(root)


def test_not_an_export(tmp_path):
    with pytest.raises(ManifestError, match=r"export directory not found"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match=r"manifest\.json: not found .*not an hms-export directory"):
        load_manifest(tmp_path / "empty")


def test_malformed_json(tmp_path):
    root = make_export(tmp_path / "e")
    (root / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match=r"manifest\.json: not valid JSON"):
        load_manifest(root)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.update(format="something-else"), r"not an hms-deploy export manifest"),
        (lambda d: d.update(format_version=FORMAT_VERSION + 1), r"newer than this hms-deploy reads"),
        (lambda d: d.update(format_version="1"), r"format_version '1' is not a positive integer"),
        (lambda d: d.pop("config"), r"no model 'config'"),
        (lambda d: d["config"].update(num_classes=1), r"malformed model config"),
        (lambda d: d.update(labels=["a", "b"]), r"2 labels, but the model has 6 classes"),
        (lambda d: d.update(T=0), r"'T' must be an integer >= 1"),
        (lambda d: d["parts"].pop("head"), r"'parts' must hold exactly"),
        (lambda d: d["parts"]["head"]["inputs"][0].update(shape=["N", 64]),
         r"part 'head': I/O \[h \(N, 64\) float32, probs \(N, 6\) float32\] do not match"),
        (lambda d: d["parts"]["head"]["inputs"][0].update(shape=[1, 128]), r"expected \['N', \.\.\.\]"),
        (lambda d: d["parts"]["head"]["inputs"][0].update(dtype="float64"), r"dtype 'float64'"),
        (lambda d: d["parts"]["head"]["sha256"].pop("onnx"), r"no sha256 for its 'onnx' file"),
        (lambda d: d["parts"]["head"]["files"].update(weird="x.bin"), r"unknown file kind 'weird'"),
        (lambda d: d["parts"]["head"].pop("gmac"), r"'gmac' \(cost per sample\) missing"),
        (lambda d: d["parts"]["head"]["files"].pop("onnx"), r"include 'onnx'"),
    ],
)
def test_bad_manifest(tmp_path, change, match):
    root = make_export(tmp_path / "e")
    edit(root, change)
    with pytest.raises(ManifestError, match=match):
        load_manifest(root, verify=False)


def test_timing_cache_path_checked(tmp_path):
    root = make_export(tmp_path / "e")
    edit(root, lambda d: d.update(tensorrt={"timing_cache": "../cache"}))
    with pytest.raises(ManifestError, match=r"timing_cache: file path '\.\./cache' leaves"):
        load_manifest(root, verify=False)


def test_manifest_with_plans(tmp_path):
    """A manifest whose parts carry TensorRT plans (stand-in plan files) loads and checks."""
    from click.testing import CliRunner

    from hms_deploy.cli.inspect import main as inspect_main
    from hms_deploy.runtime import trt_plan

    root = make_export(tmp_path / "e")
    specs = part_specs(CFG)

    def add_plans(d):
        for name in PART_NAMES:
            (root / f"{name}.plan").write_bytes(f"plan {name}".encode())
            p = d["parts"][name]
            p["files"]["trt"] = f"{name}.plan"
            p["sha256"]["trt"] = hashlib.sha256(f"plan {name}".encode()).hexdigest()
            p["trt"] = trt_plan.plan_metadata(
                spec=specs[name], plan_file=f"{name}.plan", onnx_sha256=p["sha256"]["onnx"],
                tensorrt_version="10.13.0.35", gpu_name="NVIDIA L4", compute_capability=(8, 9),
                max_batch=4, opt_batch=2, workspace_bytes=1 << 30, precision="fp32",
                flags=["no TF32"], strongly_typed=False)
        d["tensorrt"] = {"version": "10.13.0.35", "gpu": "NVIDIA L4", "compute_capability": "8.9",
                         "max_batch": 4, "opt_batch": 2, "timing_cache": "trt_timing.cache"}

    edit(root, add_plans)
    m = load_manifest(root)
    assert m.has("trt") and m.path("head", "trt") == (root / "head.plan").absolute()
    assert m.parts["head"].trt["profile"]["h"]["max"] == [4, 128]
    assert trt_plan.check_plan_compatible(m.parts["head"], "10.13.0.35", (8, 9)) is None
    assert "rebuild with" in trt_plan.check_plan_compatible(m.parts["head"], "10.14.1", (8, 9))
    result = CliRunner().invoke(inspect_main, [str(root)])
    assert result.exit_code == 0, result.stderr
    assert "plan: TensorRT 10.13.0.35, NVIDIA L4 (sm 8.9)" in result.stdout
    assert "x_a 1..4 (opt 2)" in result.stdout
    (root / "head.plan").write_bytes(b"other")
    result = CliRunner().invoke(inspect_main, [str(root)])
    assert result.exit_code == 1 and "head.plan: sha256 mismatch" in result.stderr

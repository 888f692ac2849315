"""hms-export / hms-inspect: one-line errors, no partial output, tamper detection, --force."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from hms_deploy.checkpoint import init_checkpoint, save_checkpoint
from hms_deploy.cli.export import main as export_main
from hms_deploy.cli.inspect import main as inspect_main
from hms_deploy.config import tiny_config

BIN = Path(sys.executable).parent


def run(cli, args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def one_error_line(stderr: str, prog: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog}: error: ") and "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return save_checkpoint(init_checkpoint(tiny_config(6), seed=0), root / "tiny.pt")


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-export") / "engines"
    code, stdout, stderr = run(export_main, ["--checkpoint", ckpt, "--out", out, "--steps", 3, "-q"])
    assert code == 0, stderr
    assert stdout.startswith(f"wrote {out} (ONNX, fp32, opset 17, 6 classes, T=16); parity passed")
    return out


def test_missing_checkpoint(tmp_path):
    code, _, err = run(export_main, ["--checkpoint", tmp_path / "nope.pt", "--out", tmp_path / "e"])
    assert code == 1
    assert "nope.pt: checkpoint not found" in one_error_line(err, "hms-export")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 100)
    code, _, err = run(export_main, ["--checkpoint", bad, "--out", tmp_path / "e"])
    assert code == 1
    assert "bad.pt: not a checkpoint (it is another kind of file" in one_error_line(err, "hms-export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_text_file_as_checkpoint(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("these are my notes\n" * 20)
    code, _, err = run(export_main, ["--checkpoint", notes, "--out", tmp_path / "e"])
    assert code == 1
    line = one_error_line(err, "hms-export")
    assert f"{notes}: not a checkpoint (it is text, not a file written by torch.save)" in line
    assert "internal error" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_non_empty_out_refused(ckpt, tmp_path):
    out = tmp_path / "engines"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(export_main, ["--checkpoint", ckpt, "--out", out])
    assert code == 1
    assert "output directory is not empty; use --force" in one_error_line(err, "hms-export")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _, err = run(export_main, ["--checkpoint", ckpt, "--out", out, "--force"])
    assert code == 1 and "refusing to replace it even with --force" in one_error_line(err, "hms-export")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_trt_without_tensorrt(ckpt, tmp_path):
    try:
        import tensorrt

        if hasattr(tensorrt, "Builder") and torch.cuda.is_available():
            pytest.skip("TensorRT and a GPU are present")
    except ImportError:
        pass
    code, _, err = run(export_main, ["--checkpoint", ckpt, "--out", tmp_path / "e", "--engine", "trt"])
    assert code == 3  # a backend that is unavailable (docs/commands.md)
    line = one_error_line(err, "hms-export")
    assert "TensorRT" in line and ("not installed" in line or "CUDA GPU" in line)
    assert list(tmp_path.iterdir()) == []


def test_engines_needs_trt(tmp_path):
    code, _, err = run(export_main, ["--engines", tmp_path])
    assert code == 2 and "use it with --engine trt" in one_error_line(err, "hms-export")


def test_checkpoint_required(tmp_path):
    code, _, err = run(export_main, ["--out", tmp_path / "e"])
    assert code == 2 and "--checkpoint is required" in one_error_line(err, "hms-export")


def test_baseline_refused(tmp_path):
    ck = init_checkpoint(tiny_config(6))
    ck.policy = "early_fusion"
    path = save_checkpoint(ck, tmp_path / "ef.pt")
    code, _, err = run(export_main, ["--checkpoint", path, "--out", tmp_path / "e"])
    assert code == 1 and "'early_fusion' baseline" in one_error_line(err, "hms-export")
    assert not (tmp_path / "e").exists()


def test_inspect(exported):
    code, out, err = run(inspect_main, [exported])
    assert code == 0, err
    assert "motion_gate" in out and "decision (N) int64" in out and "GMAC/sample" in out
    assert "parity:" in out and "end-to-end" in out and "torch" in out and "MISMATCH" not in out
    code, out, _ = run(inspect_main, [exported, "--json"])
    data = json.loads(out)
    assert code == 0 and data["verification"]["ok"] and data["format_version"] == 1
    assert set(data["parts"]) >= {"audio_backbone", "head"}


def test_inspect_detects_tampering(exported, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    with open(copy / "motion_cell.onnx", "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    code, out, err = run(inspect_main, [copy])
    assert code == 1
    assert "motion_cell.onnx: sha256 mismatch" in one_error_line(err, "hms-inspect")
    assert "MISMATCH" in out
    code, out, err = run(inspect_main, [tmp_path / "nothing"])
    assert code == 1 and "export directory not found" in one_error_line(err, "hms-inspect")


def test_force_replaces_export(ckpt, exported, tmp_path):
    import shutil

    out = tmp_path / "engines"
    shutil.copytree(exported, out)
    old = json.loads((out / "manifest.json").read_text())["created"]
    (out / "stale.onnx").write_text("left from an older export")
    time.sleep(1.1)
    code, stdout, err = run(export_main, ["--checkpoint", ckpt, "--out", out, "--force", "--steps", 2,
                                          "--precision", "fp16", "-q"])
    assert code == 0, err
    man = json.loads((out / "manifest.json").read_text())
    assert man["created"] != old and man["precision"] == "fp16"
    assert man["parity"]["status"] == "not validated" and "parity not validated" in stdout
    assert not (out / "stale.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]


def test_sigterm_leaves_no_partial_output(ckpt, tmp_path):
    out = tmp_path / "engines"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([str(BIN / "hms-export"), "--checkpoint", str(ckpt), "--out", str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".engines.partial-*/*.onnx")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".engines.partial-*")), "export never started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert one_error_line(err, "hms-export").endswith("interrupted")
    assert list(tmp_path.iterdir()) == []

"""An export's files are hashed once per process while they are unchanged (every Session of
an export, a Ray driver's included, verifies it); a rewritten file is hashed again."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_manifest import make_export

from hms_deploy.errors import ManifestError
from hms_deploy.runtime import manifest
from hms_deploy.runtime.manifest import load_manifest


def test_an_export_is_read_once_per_process(tmp_path, monkeypatch):
    root = make_export(tmp_path / "e")
    reads: list[str] = []
    real = manifest.sha256_file

    def counted(path, *args):
        reads.append(Path(path).name)
        return real(path, *args)

    monkeypatch.setattr(manifest, "sha256_file", counted)
    m = load_manifest(root)
    files = sorted(rel for e in m.parts.values() for rel in e.files.values())
    assert sorted(reads) == files  # the first open reads every file once
    load_manifest(root)
    load_manifest(root)
    assert sorted(reads) == files  # later opens in this process read none again
    (root / "appearance_cell.onnx").write_bytes(b"tampered")
    with pytest.raises(ManifestError, match=r"appearance_cell\.onnx: sha256 mismatch"):
        load_manifest(root)
    assert reads[len(files):] == ["appearance_cell.onnx"]  # only the changed file

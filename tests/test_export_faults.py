"""hms-export under faults: one export per target (a second refuses naming the holder, or
waits with --wait), and a full disk names the file it could not write."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hms_deploy.checkpoint import init_checkpoint, save_checkpoint
from hms_deploy.config import tiny_config

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return save_checkpoint(init_checkpoint(tiny_config(6), seed=0), root / "tiny.pt")


def _export(ckpt, out, *args, **kw):
    return subprocess.Popen(
        [str(BIN / "hms-export"), "--checkpoint", str(ckpt), "--out", str(out), "--steps", "2",
         *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}, **kw)


def _wait_started(root: Path, proc, timeout: float = 120) -> None:
    """Until the export in ``proc`` writes its first part (it holds the lock by then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if list(root.glob(".engines.partial-*/*.onnx")):
            return
        time.sleep(0.05)
    raise AssertionError(f"export did not start: {proc.poll()}")


def test_a_second_export_refuses_at_once_naming_the_holder_or_waits(ckpt, tmp_path):
    """The first export is stopped (SIGSTOP) mid-way, holding the lock, while a second one
    (through a symlink to the same target) refuses and a third one (--wait) waits."""
    out = tmp_path / "engines"
    (tmp_path / "link").symlink_to(out)  # another name of the same target
    first = _export(ckpt, out, "-q")
    third = None
    try:
        _wait_started(tmp_path, first)
        first.send_signal(signal.SIGSTOP)
        second = _export(ckpt, tmp_path / "link", "-q")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 3, err
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"hms-export: error: {tmp_path / 'link'}: another hms-export "
                               f"is writing it (pid {first.pid}) on {socket.gethostname()} since ")
        assert "--wait waits for it" in line
        assert "exported" not in err  # refused before any part was exported
        third = _export(ckpt, out, "--force", "--wait")
        assert third.stderr.readline().startswith(
            f"{out}: waiting for another hms-export (pid {first.pid}) on ")
        first.send_signal(signal.SIGCONT)
        _, err1 = first.communicate(timeout=300)
        assert first.returncode == 0, err1
        created = json.loads((out / "manifest.json").read_text())["created"]
        out3, err3 = third.communicate(timeout=300)
        assert third.returncode == 0, err3
    finally:
        for p in (first, third):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.communicate()
    assert out3.startswith(f"wrote {out} ")
    assert json.loads((out / "manifest.json").read_text())["created"] >= created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines", "link"]  # no lock left


def _fsize_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (a real full disk: ENOSPC); skipped where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
def test_a_full_disk_names_the_file_and_leaves_nothing(ckpt, tmp_path, how, request):
    if how == "tmpfs":  # ENOSPC, "No space left on device"
        root = request.getfixturevalue("small_tmpfs")
        proc = _export(ckpt, root / "engines", "-q")
        reason = "No space left on device"
    else:  # EFBIG past 600 kB per file: what a quota or a size limit gives
        root = tmp_path
        proc = _export(ckpt, root / "engines", "-q", preexec_fn=_fsize_limit(600_000))
        reason = "File too large"
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"hms-export: error: {root / 'engines'}: cannot write the export: "
                           f"{reason} (writing {root}/.engines.partial-{proc.pid}/"), line
    assert ".onnx)" in line and "nothing was written to" in line
    assert [p.name for p in root.iterdir() if p.name != "tiny.pt"] in ([], ["mnt"])

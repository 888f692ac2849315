"""hms-extract end to end: a clean run, a run killed mid-record then resumed (same store as
one clean run), bad rows recorded while good videos are extracted, a missing column."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import video_features

from hms_deploy.checkpoint import init_checkpoint, save_checkpoint
from hms_deploy.config import tiny_config
from hms_deploy.data.features import open_store
from hms_deploy.data.synthetic import DEFAULT_CLASSES, render_class_video

EXE = str(Path(sys.executable).parent / "hms-extract")
LABELS = list(DEFAULT_CLASSES)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    rows = []
    for k, label in enumerate(LABELS[:5]):
        rel = f"videos/{label}.mp4"
        render_class_video(root / rel, label, seed=1, index=k, duration_s=1.0, fps=8,
                           size=(64, 48))
        rows.append(f"{rel},{label}")
    (root / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    ckpt = init_checkpoint(tiny_config(len(LABELS), steps=4), labels=LABELS)
    save_checkpoint(ckpt, root / "tiny.pt")
    return root


def run(data: Path, out: Path, *extra: str, env: dict | None = None, csv: str = "list.csv"):
    cmd = [EXE, "--checkpoint", str(data / "tiny.pt"), "--list", str(data / csv),
           "--out", str(out), "--workers", "0", "--quiet", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, **(env or {})})


# hms-extract in a process that dies like a SIGKILL (os._exit(137)) when it is about to index
# video N + 1 (N = argv[1]): that video's features are already written but not yet committed,
# the worst place to be killed.
KILLED_EXTRACT = """
import os, sys
from hms_deploy.cli.extract import main
from hms_deploy.data.features import FeatureStore
after, commit, done = int(sys.argv[1]), FeatureStore.commit, []
def commit_or_die(self, **kw):
    if len(done) == after:
        os._exit(137)
    done.append(kw["key"])
    return commit(self, **kw)
FeatureStore.commit = commit_or_die
main(sys.argv[2:], prog_name="hms-extract")
"""


def run_killed(data: Path, out: Path, after: int):
    cmd = [sys.executable, "-c", KILLED_EXTRACT, str(after), "--checkpoint", str(data / "tiny.pt"),
           "--list", str(data / "list.csv"), "--out", str(out), "--workers", "0", "--quiet"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def snapshot(store_dir: Path) -> dict:
    s = open_store(store_dir)
    out = {}
    for r in s.records:
        f = video_features(s, r.key)
        out[r.key] = ((r.label, r.label_index, r.duration_s, r.has_audio), f)
    return out


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k][0] == b[k][0]
        for m in a[k][1]:
            np.testing.assert_array_equal(a[k][1][m], b[k][1][m], err_msg=f"{k} {m}")


def test_clean_run_and_rerun_skips(data, tmp_path):
    r = run(data, tmp_path / "st", "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "5 extracted" in r.stdout
    s = open_store(tmp_path / "st")
    assert len(s) == 5 and s.steps == 4 and s.meta.dtype == "float16"
    assert all(rec.has_audio for rec in s.records)
    assert {rec.duration_s for rec in s.records} == {1.0}
    f = video_features(s, "videos/tone_low.mp4")
    assert f["audio"].shape == (4, 64) and f["appearance"].shape == (4, 128)
    assert f["motion"].shape == (4, 192) and np.isfinite(f["motion"]).all()
    r2 = run(data, tmp_path / "st")
    assert r2.returncode == 0 and "0 extracted, 5 already in the store" in r2.stdout


def test_killed_run_resumes_to_the_same_store(data, tmp_path):
    clean = run(data, tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr
    killed = run_killed(data, tmp_path / "st", after=2)
    assert killed.returncode == 137
    assert len(open_store(tmp_path / "st")) == 2  # the third video's features are unindexed
    assert (tmp_path / "st" / "features" / "motion" / "00000.bin").stat().st_size > \
        2 * 4 * 192 * 2
    resumed = run(data, tmp_path / "st")
    assert resumed.returncode == 0, resumed.stderr
    assert "3 extracted, 2 already in the store" in resumed.stdout
    assert_same(snapshot(tmp_path / "clean"), snapshot(tmp_path / "st"))


def test_bad_rows_are_recorded_and_good_videos_extracted(data, tmp_path):
    (data / "videos" / "notes.txt").write_text("not a video")
    good = (data / "videos" / "red_disc.mp4").read_bytes()
    (data / "videos" / "corrupt.mp4").write_bytes(good[: len(good) // 3])
    (data / "bad.csv").write_text(
        "path,label\n"
        "videos/tone_low.mp4,tone_low\n"
        "videos/notes.txt,tone_low\n"
        "videos/corrupt.mp4,red_disc\n"
        "videos/missing.mp4,tone_high\n"
        "videos/red_disc.mp4,no_such_class\n"
        "videos/move_left.mp4,move_left\n"
    )
    r = run(data, tmp_path / "st", csv="bad.csv")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("hms-extract: error: ")
    assert "Traceback" not in r.stderr
    s = open_store(tmp_path / "st")
    errors = {e["key"]: e["error"] for e in s.errors()}
    assert "videos/missing.mp4" in errors and "no such file" in errors["videos/missing.mp4"]
    assert "videos/notes.txt" in errors
    assert "unknown label 'no_such_class'" in errors["videos/red_disc.mp4"]
    # a truncated MP4 either fails cleanly or yields what its frames allow; never both
    assert ("videos/corrupt.mp4" in errors) != ("videos/corrupt.mp4" in s)
    assert {"videos/tone_low.mp4", "videos/move_left.mp4"} <= set(s.keys())
    assert "failed" in r.stdout and f"{len(errors)} failed" in r.stdout
    assert len(r.stderr.strip().splitlines()) <= 12


def test_missing_column_is_one_line(data, tmp_path):
    (data / "nolabel.csv").write_text("path,class\nvideos/tone_low.mp4,tone_low\n")
    r = run(data, tmp_path / "st", csv="nolabel.csv")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing column 'label'" in lines[0]
    assert not (tmp_path / "st").exists()


def test_other_checkpoint_is_refused(data, tmp_path):
    r = run(data, tmp_path / "st", "--steps", "2")
    assert r.returncode == 0, r.stderr
    r = run(data, tmp_path / "st")  # T=4 into a T=2 store
    assert r.returncode == 3 and "steps 2 (store) vs 4" in r.stderr
    assert "; 5 video(s) not attempted" in r.stderr
    meta = json.loads((tmp_path / "st" / "store.json").read_text())
    assert meta["steps"] == 2


def test_changed_video_is_extracted_again_and_superseded(data, tmp_path):
    src = tmp_path / "d"
    shutil.copytree(data, src)
    r = run(src, tmp_path / "st")
    assert r.returncode == 0, r.stderr
    before = snapshot(tmp_path / "st")
    # a video rewritten with other content (e.g. it was still being written before)
    render_class_video(src / "videos" / "tone_low.mp4", "red_disc", seed=9, index=0,
                       duration_s=1.5, fps=8, size=(64, 48))
    r = run(src, tmp_path / "st")
    assert r.returncode == 0, r.stderr
    assert "1 extracted, 4 already in the store" in r.stdout
    after = snapshot(tmp_path / "st")
    assert sorted(after) == sorted(before)
    assert after["videos/tone_low.mp4"][0][2] == 1.5  # the new file's duration
    assert not np.array_equal(after["videos/tone_low.mp4"][1]["appearance"],
                              before["videos/tone_low.mp4"][1]["appearance"])
    for k in before:
        if k != "videos/tone_low.mp4":
            np.testing.assert_array_equal(after[k][1]["motion"], before[k][1]["motion"])
    index = (tmp_path / "st" / "index.jsonl").read_text().splitlines()
    assert len(index) == 5  # one line per video (the superseded one compacted away)
    rec = json.loads(next(x for x in index if "tone_low" in x))
    assert rec["size"] == (src / "videos" / "tone_low.mp4").stat().st_size


def test_locked_store_exits_3(data, tmp_path):
    from hms_deploy.outputs import OutputLock

    (tmp_path / "st").mkdir()
    bad = tmp_path / "not-a-checkpoint.pt"
    bad.write_text("text, not a checkpoint")
    with OutputLock(tmp_path / "st" / ".lock", tmp_path / "st", "hms-extract"):
        r = run(data, tmp_path / "st")
        # the lock comes before the model: refused the same way, the checkpoint never read
        early = subprocess.run([EXE, "--checkpoint", str(bad), "--list", str(data / "list.csv"),
                                "--out", str(tmp_path / "st"), "--quiet"], capture_output=True,
                               text=True, timeout=300, check=False)
    assert early.returncode == 3, early.stderr
    assert f"another hms-extract is writing it (pid {os.getpid()})" in early.stderr
    assert "checkpoint" not in early.stderr
    assert r.returncode == 3
    line = r.stderr.strip().splitlines()[-1]
    assert f"another hms-extract is writing it (pid {os.getpid()})" in line
    assert "; 5 video(s) not attempted" in line


def test_full_disk_exits_3_and_resumes(data, tmp_path):
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        # the first shard holds 2 videos: 2 * 4 steps * 192 dims * 2 bytes of motion
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 4 * 192 * 2 + 100,) * 2)

    cmd = [EXE, "--checkpoint", str(data / "tiny.pt"), "--list", str(data / "list.csv"),
           "--out", str(tmp_path / "st"), "--workers", "0", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                       preexec_fn=limit)
    assert r.returncode == 3, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "cannot write" in line and "File too large" in line
    assert "3 of 5 video(s) not in the store (rerun with the same --out to resume)" in line
    assert len(open_store(tmp_path / "st")) == 2
    r = run(data, tmp_path / "st")
    assert r.returncode == 0 and "3 extracted, 2 already in the store" in r.stdout

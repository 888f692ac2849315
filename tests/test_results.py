"""``--output results.jsonl``: keyed on resolved path + file identity + settings, one current
record per video, locked, crash-safe (kills at random moments, a full disk)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from hms_deploy.errors import ConfigError
from hms_deploy.outputs import OutputLocked
from hms_deploy.runtime.results import ResultsFile, SettingsMismatch

S = {"model": "abc", "policy": "learned", "T": 16}


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _video(path, data=b"video bytes"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_append_done_and_one_line_per_video(tmp_path):
    a, b = _video(tmp_path / "a.mp4"), _video(tmp_path / "b.mp4")
    out = tmp_path / "sub" / "r.jsonl"
    with ResultsFile(out, settings=S) as r:
        assert not r.done(a)
        r.append({"video": str(a), "label": "x"})
        r.append({"video": str(b), "error": "broken"})
        assert r.done(a) and not r.done(b)
    lines = _lines(out)
    assert [x["video"] for x in lines] == [str(a), str(b)]
    assert lines[0]["source"] == {"path": str(a.resolve()), "size": 11,
                                  "mtime_ns": a.stat().st_mtime_ns, "ino": a.stat().st_ino}
    assert lines[0]["settings"] == S
    with ResultsFile(out, settings=S) as r:
        assert r.done(a) and not r.done(b)  # an error record is retried
        assert not r.torn and r.warnings == []
        r.append({"video": str(b), "label": "y"})
        assert len(_lines(out)) == 3  # superseding line appended during the run ...
    lines = _lines(out)  # ... and the file compacted on close: one current record each
    assert [(x["video"], x["label"]) for x in lines] == [(str(a), "x"), (str(b), "y")]
    assert ResultsFile(out, settings=S).counts() == {"videos": 2, "results": 2, "errors": 0}


def test_resolved_path_finds_another_name(tmp_path, monkeypatch):
    a = _video(tmp_path / "d" / "a.mp4")
    (tmp_path / "link.mp4").symlink_to(a)
    out = tmp_path / "r.jsonl"
    with ResultsFile(out, settings=S) as r:
        r.append({"video": str(a), "label": "x"})
    monkeypatch.chdir(tmp_path / "d")
    with ResultsFile(out, settings=S) as r:
        assert r.done("a.mp4") and r.done("../d/./a.mp4") and r.done(tmp_path / "link.mp4")


def test_changed_file_runs_again_and_replaces_its_record(tmp_path):
    a = _video(tmp_path / "a.mp4", b"first part")
    out = tmp_path / "r.jsonl"
    with ResultsFile(out, settings=S) as r:
        r.append({"video": str(a), "label": "partial"})
    with open(a, "ab") as f:
        f.write(b" and the rest")  # a growing file
    with ResultsFile(out, settings=S) as r:
        assert not r.done(a)
        r.append({"video": str(a), "label": "complete"})
    os.utime(a, ns=(a.stat().st_atime_ns, a.stat().st_mtime_ns + 10**9))  # same size, touched
    with ResultsFile(out, settings=S) as r:
        assert not r.done(a)
    lines = _lines(out)
    assert len(lines) == 1 and lines[0]["label"] == "complete"
    assert lines[0]["source"]["size"] == len(b"first part and the rest")


def test_identity_is_taken_before_the_run(tmp_path):
    a = _video(tmp_path / "a.mp4", b"short")
    out = tmp_path / "r.jsonl"
    with ResultsFile(out, settings=S) as r:
        assert not r.done(a)  # remembers size 5
        a.write_bytes(b"grew while it was classified")
        r.append({"video": str(a), "label": "x"})
    assert not ResultsFile(out, settings=S).done(a)  # so the next run classifies it again


def test_other_settings_refuse_naming_the_setting(tmp_path):
    a = _video(tmp_path / "a.mp4")
    out = tmp_path / "r.jsonl"
    with ResultsFile(out, settings=S) as r:
        r.append({"video": str(a), "label": "x"})
    with pytest.raises(SettingsMismatch, match=r'policy "learned" there, "dense" now') as e:
        ResultsFile(out, settings={**S, "policy": "dense"})
    assert "T" not in str(e.value).split("(")[1].split(")")[0].split(";")[0]
    with pytest.raises(SettingsMismatch, match=r'budget null there, 2.5 now'):
        ResultsFile(out, settings={**S, "budget": 2.5})
    # mode new: the first free NAME.N.jsonl; mode overwrite: start over
    with ResultsFile(out, settings={**S, "policy": "dense"}, mode="new") as r:
        assert r.path == tmp_path / "r.1.jsonl" and not r.done(a)
        r.append({"video": str(a), "label": "y"})
    assert ResultsFile(out, settings=S, mode="new").path == tmp_path / "r.2.jsonl"
    with ResultsFile(out, settings={**S, "T": 8}, mode="overwrite") as r:
        assert not r.done(a)
    assert out.read_text() == ""
    with pytest.raises(ConfigError, match="output mode 'append'"):
        ResultsFile(out, mode="append")


def test_legacy_lines_run_again_and_are_replaced(tmp_path):
    a = _video(tmp_path / "a.mp4")
    out = tmp_path / "r.jsonl"
    out.write_text(json.dumps({"video": str(a), "label": "old"}) + "\n")
    with ResultsFile(out, settings=S) as r:
        assert not r.done(a)
        r.append({"video": str(a), "label": "new"})
    assert [x["label"] for x in _lines(out)] == ["new"]


def test_torn_last_line_is_cut(tmp_path):
    a = _video(tmp_path / "a.mp4")
    out = tmp_path / "r.jsonl"
    with ResultsFile(out, settings=S) as r:
        r.append({"video": str(a), "label": "x"})
    with open(out, "a") as f:
        f.write('{"video": "b.mp4", "lab')
    with ResultsFile(out, settings=S) as r:
        assert r.torn and r.done(a) and r.warnings == []
    assert len(_lines(out)) == 1


def test_complete_last_line_without_newline_is_kept(tmp_path):
    a = _video(tmp_path / "a.mp4")
    out = tmp_path / "r.jsonl"
    with ResultsFile(out, settings=S) as r:
        r.append({"video": str(a), "label": "x"})
    out.write_text(out.read_text().rstrip("\n"))
    b = _video(tmp_path / "b.mp4")
    with ResultsFile(out, settings=S) as r:
        assert not r.torn and r.done(a)
        r.append({"video": str(b), "label": "y"})
    assert [x["video"] for x in _lines(out)] == [str(a), str(b)]


def test_corrupted_middle_line_warns_and_is_kept(tmp_path):
    a, b = _video(tmp_path / "a.mp4"), _video(tmp_path / "b.mp4")
    out = tmp_path / "r.jsonl"
    with ResultsFile(out, settings=S) as r:
        r.append({"video": str(a), "label": "x"})
        r.append({"video": str(b), "label": "y"})
    first, second = out.read_text().splitlines()
    out.write_text(first + "\n" + second[:40] + "\x00garbage\n" + '{"video": 3}\n')
    with ResultsFile(out, settings=S) as r:
        assert r.warnings == [
            f"{out}: 2 line(s) are not result records (line 2, 3): kept as they are and ignored"
        ]
        assert r.done(a) and not r.done(b)
        r.append({"video": str(b), "label": "y2"})
        r.append({"video": str(a), "label": "x2"})  # supersedes: compaction keeps the garbage
    text = out.read_text().splitlines()
    assert len(text) == 4 and "garbage" in text[0] and text[1] == '{"video": 3}'


def test_output_paths_that_cannot_be_files(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        ResultsFile(tmp_path)
    (tmp_path / "a").write_text("a file")
    with pytest.raises(ConfigError, match=r"'.*/a' is a file, not a directory"):
        ResultsFile(tmp_path / "a" / "b" / "r.jsonl")


def test_one_writer(tmp_path):
    out = tmp_path / "r.jsonl"
    first = ResultsFile(out, settings=S)
    with pytest.raises(OutputLocked, match=rf"another hms-run is writing it \(pid {os.getpid()}\)"):
        ResultsFile(out, settings=S)
    first.close()
    ResultsFile(out, settings=S).close()  # released on close
    # a process killed while holding it releases it too (the kernel drops the flock)
    with _held(out) as p, pytest.raises(OutputLocked, match=f"pid {p.pid}"):
        ResultsFile(out)
    ResultsFile(out).close()


@contextlib.contextmanager
def _held(out):
    """A process that holds ResultsFile(out) while the block runs, then is killed."""
    code = f"from hms_deploy.runtime.results import ResultsFile; r = ResultsFile({str(out)!r}); " \
           "print('locked', flush=True); import time; time.sleep(60)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        yield p
    finally:
        p.kill()
        p.wait()
        p.stdout.close()


def test_every_name_of_the_output_meets_one_lock(tmp_path, monkeypatch):
    """A symlink, ``..`` through a symlinked directory, a hard link: one writer at a time."""
    real = tmp_path / "data" / "cc.jsonl"
    real.parent.mkdir()
    real.write_text("")
    (tmp_path / "link.jsonl").symlink_to(real)
    (tmp_path / "data" / "sub").mkdir()
    (tmp_path / "elsewhere").symlink_to(tmp_path / "data" / "sub")  # elsewhere/.. is data/
    os.link(real, tmp_path / "hard.jsonl")
    names = [tmp_path / "link.jsonl", tmp_path / "elsewhere" / ".." / "cc.jsonl",
             tmp_path / "data" / "sub" / ".." / "cc.jsonl", tmp_path / "hard.jsonl"]
    with _held(real) as p:
        for name in names:
            with pytest.raises(OutputLocked, match=f"pid {p.pid}|another name of the same file"):
                ResultsFile(name, settings=S)
    # and the other way round
    with _held(tmp_path / "link.jsonl") as p, pytest.raises(OutputLocked, match=f"pid {p.pid}"):
        ResultsFile(real, settings=S)


def test_a_symlinked_output_stays_a_link_and_its_lock_follows_compaction(tmp_path):
    a = _video(tmp_path / "a.mp4")
    real = tmp_path / "cc.jsonl"
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    with ResultsFile(link, settings=S) as r:
        assert r.path == real
        r.append({"video": str(a), "label": "x"})
        r.append({"video": str(a), "label": "y"})  # supersedes: compacted
        r.compact()
        os.link(real, tmp_path / "hard.jsonl")  # a name of the compacted file
        with pytest.raises(OutputLocked, match="another name of the same file"):
            ResultsFile(tmp_path / "hard.jsonl", settings=S)
    assert link.is_symlink() and [x["label"] for x in _lines(real)] == ["y"]
    assert not (tmp_path / "link.jsonl.lock").exists()


def test_a_hard_linked_video_is_one_video(tmp_path):
    a = _video(tmp_path / "a.mp4")
    os.link(a, tmp_path / "b.mp4")
    out = tmp_path / "r.jsonl"
    with ResultsFile(out, settings=S) as r:
        assert not r.done(a)
        r.append({"video": str(a), "label": "x"})
        assert r.done(tmp_path / "b.mp4")
    with ResultsFile(out, settings=S) as r:
        assert r.done(tmp_path / "b.mp4")
        _video(tmp_path / "c.mp4", b"a new file")
        os.replace(tmp_path / "c.mp4", a)  # an atomic mv over both names: not done
        assert not r.done(a)
        r.append({"video": str(a), "label": "z"})
        assert not r.done(tmp_path / "b.mp4")  # still the old inode: another file now
        r.append({"video": str(tmp_path / "b.mp4"), "label": "w"})
    assert sorted(x["label"] for x in _lines(out)) == ["w", "z"]


_WRITER = textwrap.dedent("""
    import sys
    import time
    from hms_deploy.runtime.results import ResultsFile
    out, videos = sys.argv[1], sys.argv[2:]
    while True:
        with ResultsFile(out, settings={"s": 1}) as r:
            for i, v in enumerate(videos):
                seq = time.time_ns()  # increases across the writer processes
                rec = {"video": v, "seq": seq, "pad": "x" * (50 * (seq // 1000 % 7))}
                if seq // 1000 % 3 == 0:
                    rec["error"] = "flaky"
                r.append(rec)
                print(v, seq, flush=True)
""")


def test_kills_at_random_moments_never_break_the_file(tmp_path):
    """SIGKILL a writer that appends superseding lines and compacts, 15 times at random."""
    videos = [str(_video(tmp_path / f"v{i}.mp4")) for i in range(6)]
    out = tmp_path / "r.jsonl"
    acked: dict[str, int] = {}
    rng = random.Random(0)
    for _ in range(15):
        p = subprocess.Popen([sys.executable, "-c", _WRITER, str(out), *videos],
                             stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline()  # started writing
            time.sleep(rng.uniform(0.0, 0.4))
            p.send_signal(signal.SIGKILL)
            # the kill can cut the last print short: only whole lines are acknowledgements
            for line in p.stdout.read().split("\n")[:-1]:
                v, seq = line.split()
                acked[v] = max(acked.get(v, 0), int(seq))
        finally:
            p.wait()
            p.stdout.close()
        with ResultsFile(out, settings={"s": 1}) as r:
            assert r.warnings == []
        lines = _lines(out)  # valid JSONL, one current line per video
        assert len({x["video"] for x in lines}) == len(lines)
        for x in lines:
            assert x["seq"] >= acked.get(x["video"], 0)  # no acknowledged record lost
        for v in acked:
            assert v in {x["video"] for x in lines}
    assert len(acked) == len(videos)


def test_a_full_disk_leaves_no_partial_line(tmp_path):
    """RLIMIT_FSIZE makes writes past N bytes fail (EFBIG), like a full disk."""
    videos = [str(_video(tmp_path / f"v{i}.mp4")) for i in range(20)]
    out = tmp_path / "r.jsonl"
    code = textwrap.dedent(f"""
        import resource, signal, sys
        from hms_deploy.runtime.results import ResultsFile
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        r = ResultsFile({str(out)!r})
        try:
            for v in {videos!r}:
                r.append({{"video": v, "label": "x" * 40}})
        except OSError as e:
            print("stopped", e.errno, flush=True)
        r.close()
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.stdout.startswith("stopped 27"), res.stderr  # EFBIG
    lines = _lines(out)  # every line complete
    assert 0 < len(lines) < 20 and out.stat().st_size <= 1000
    assert out.read_text().endswith("\n")


def test_a_bind_mount_is_another_name_of_the_same_output_and_video(tmp_path):
    """Bind mounts (where this process may mount): the output file bound onto another
    path meets the same lock; a video reached through a bound directory is one video."""
    from hms_deploy.cli.inputs import expand

    real = tmp_path / "cc.jsonl"
    real.write_text("")
    other = tmp_path / "other.jsonl"
    other.write_text("")
    videos = tmp_path / "videos"
    a = _video(videos / "a.mp4")
    view = tmp_path / "view"
    view.mkdir()
    mounted = []
    try:
        for src, dst in ((real, other), (videos, view)):
            r = subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True,
                               text=True, check=False)
            if r.returncode != 0:
                pytest.skip(f"cannot bind-mount here ({r.stderr.strip() or r.returncode})")
            mounted.append(dst)
        with ResultsFile(real, settings=S) as r:
            with pytest.raises(OutputLocked, match="another name of the same file"):
                ResultsFile(other, settings=S)
            r.append({"video": str(a), "label": "x"})
        with ResultsFile(tmp_path / "r2.jsonl", settings=S) as r:
            r.append({"video": str(a), "label": "x"})
            assert r.done(view / "a.mp4")
        inputs = expand([str(a), str(view / "a.mp4")])
        assert inputs.videos == [str(a)] and inputs.duplicates == 1
    finally:
        for dst in reversed(mounted):
            subprocess.run(["umount", "-l", str(dst)], check=False)  # even if a file is open


def test_a_signal_during_a_held_block_comes_after_it():
    """hms-run writes a record and counts it inside signals_held: SIGTERM (and SIGINT) sent
    in the middle raise only once both are done, so the count it prints on the way out
    matches the output file."""
    from hms_deploy.outputs import Terminated, signals_held, sigterm_raises

    done = []
    with pytest.raises(Terminated), sigterm_raises():
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("written")
            done.append("counted")
        done.append("after the block")  # not reached: the held signal raises first
    assert done == ["written", "counted"]
    # Python's own SIGINT handler, whatever this process inherited (a job started in the
    # background by a shell ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("still held")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert done[-1] == "still held"


def test_a_signal_taken_by_another_thread_still_waits_for_the_held_block():
    """hms-run has other threads (decode read-ahead, ONNX Runtime): the kernel may hand a
    process-directed SIGTERM to one of them, and Python runs the handler in the main thread
    at once. Here the main thread is the only one busy in the block; another thread exists
    that does not block signals."""
    import threading

    from hms_deploy.outputs import Terminated, signals_held, sigterm_raises

    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    done = []
    try:
        with pytest.raises(Terminated), sigterm_raises():
            with signals_held():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):  # bytecodes enough for a pending handler to run
                    done.append("written")
                done.append("counted")
            done.append("after the block")
    finally:
        stop.set()
        other.join()
    assert done[-1] == "counted" and len(done) == 1001

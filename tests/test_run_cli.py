"""``hms-run``: inputs, output formats, failures, resume after a kill, every bad option."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from runtime_helpers import (  # noqa: F401 - one_torch_thread is an autouse fixture
    STEPS,
    assets,
    make_videos,
    one_torch_thread,
)

from hms_deploy.cli.run import expand_inputs, main, strip


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _json_lines(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def _strip_resume(line: dict) -> dict:
    """An --output line without the fields that key resume: the record --json prints."""
    return {k: v for k, v in line.items() if k not in ("source", "settings")}


def test_human_summary_and_json(tmp_path):
    a = assets()
    r = run(a.video, "--engines", a.engines)
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"{a.video}: ") and "GMAC" in lines[0]
    assert lines[1].startswith("  top: ")
    r2 = run(a.video, "--engines", a.engines, "--json")
    rec = _json_lines(r2.stdout)[0]
    assert lines[2] == "  A/I/M: " + strip(rec["decisions"])
    assert len(strip(rec["decisions"])) == STEPS
    assert set(strip(rec["decisions"])) <= {".", "i", "M"}
    assert rec["engine"] == "onnx" and rec["label"] in lines[0]
    # --checkpoint alone means the torch engine; same decisions and top-1
    r3 = run(a.video, "--checkpoint", a.checkpoint, "--json", "--topk", "6")
    rt = _json_lines(r3.stdout)[0]
    assert rt["engine"] == "torch" and len(rt["topk"]) == 6
    assert rt["decisions"] == rec["decisions"] and rt["label"] == rec["label"]


def test_strip():
    assert strip({"appearance": [0, 1, 1, 0], "motion": [0, 0, 1, 0]}) == ".iM."


def test_online_json(tmp_path):
    a = assets()
    out = tmp_path / "r.jsonl"
    r = run(a.video, "--engines", a.engines, "--json", "--online", "--steps", "4",
            "--output", out)
    assert r.exit_code == 0, r.stderr
    recs = _json_lines(r.stdout)
    assert [x.get("partial", False) for x in recs] == [True] * 4 + [False]
    assert len(_json_lines(out.read_text())) == 1  # partial lines never go to --output


def test_inputs_dirs_and_lists(tmp_path):
    videos = make_videos(tmp_path / "d" / "sub", 2)
    (tmp_path / "d" / "notes.txt").write_text("not a video")
    lst = tmp_path / "list.txt"
    lst.write_text(f"# a comment\n\n{videos[1]}\n{tmp_path / 'd'}\n")
    assert expand_inputs((str(tmp_path / "d"),)) == [str(v) for v in videos]
    # videos[1] comes first (from the list), then the directory adds only videos[0]
    assert expand_inputs((f"@{lst}", "x.mp4")) == [str(videos[1]), str(videos[0]), "x.mp4"]
    r = run(f"@{lst}", "--engines", assets().engines, "--json", "--policy", "audio-only")
    assert r.exit_code == 0, r.stderr
    assert len(_json_lines(r.stdout)) == 2
    assert f"warning: '{videos[1]}' given more than once: classified once" in r.stderr
    assert "2 input(s): 2 classified, 0 failed, 1 scan warning(s)" in r.stderr


def test_scan_probes_files_without_an_extension(tmp_path):
    from hms_deploy.cli.inputs import expand
    from hms_deploy.data.synthetic import render_class_video

    d = tmp_path / "d"
    render_class_video(d / "clip.mp4", "red_disc", seed=0, duration_s=1.0, size=(64, 48))
    (d / "clip.mp4").rename(d / "clip")  # an MP4 without an extension: found by probing
    (d / "README").write_text("notes, not a video\n")
    (d / "blob").write_bytes(b"\x00" * 600)
    (d / "notes.txt").write_text("skipped by extension, as before")
    got = expand([str(d)])
    assert got.videos == [str(d / "clip")] and not got.problems
    assert got.warnings == [(f"2 file(s) without an extension are not videos (probed): "
                            f"skipped: '{d / 'README'}', '{d / 'blob'}'")]


def test_twenty_videos_two_corrupt(tmp_path):
    videos = make_videos(tmp_path / "v", 20, corrupt=(5, 12))
    out = tmp_path / "r.jsonl"
    r = run(tmp_path / "v", "--engines", assets().engines, "--json", "--output", out,
            "--policy", "every:4")
    assert r.exit_code != 0
    recs = _json_lines(r.stdout)
    assert len(recs) == 20
    errors = [x for x in recs if "error" in x]
    assert sorted(x["video"] for x in errors) == [str(videos[5]), str(videos[12])]
    assert all(set(x) == {"video", "error"} for x in errors)
    summary = [ln for ln in r.stderr.splitlines() if "input(s)" in ln or "failed" in ln
               and not ln.startswith("hms-run: error:")]
    assert summary == ["hms-run: 20 input(s): 18 classified, 2 failed"], r.stderr  # one line
    assert [_strip_resume(x) for x in _json_lines(out.read_text())] == recs
    # rerun: the 18 results are skipped, the 2 errors retried (fixed one now succeeds)
    videos[5].write_bytes(assets().video.read_bytes())
    r = run(tmp_path / "v", "--engines", assets().engines, "--json", "--output", out,
            "--policy", "every:4")
    assert r.exit_code != 0  # video 12 is still broken
    assert "18 video(s) already in" in r.stderr
    recs = _json_lines(r.stdout)
    assert [x["video"] for x in recs] == [str(videos[5]), str(videos[12])]
    assert "error" not in recs[0] and "error" in recs[1]
    lines = _json_lines(out.read_text())  # one current record per video: errors replaced
    assert sorted(x["video"] for x in lines) == sorted(str(v) for v in videos)
    assert [x["video"] for x in lines if "error" in x] == [str(videos[12])]


def test_killed_midway_then_resumed(tmp_path):
    videos = make_videos(tmp_path / "v", 20)
    out = tmp_path / "r.jsonl"
    args = [str(tmp_path / "v"), "--engines", str(assets().engines), "--output", str(out),
            "--json", "--no-progress"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "hms_deploy.cli.run", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "finished before it could be killed: " + proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    first = out.read_text().count("\n")
    assert 3 <= first < 20
    r = run(*args)
    assert r.exit_code == 0, r.stderr
    lines = _json_lines(out.read_text())
    assert sorted(x["video"] for x in lines) == sorted(str(v) for v in videos)  # once each
    assert all("error" not in x for x in lines)
    assert len(_json_lines(r.stdout)) == 20 - first


def test_torn_output_line_is_ignored(tmp_path):
    a = assets()
    out = tmp_path / "r.jsonl"
    out.write_text(f'{{"video": "{a.video}", "label": "x", "sc')
    r = run(a.video, "--engines", a.engines, "--output", out)
    assert r.exit_code == 0, r.stderr
    lines = _json_lines(out.read_text())
    assert len(lines) == 1 and lines[0]["video"] == str(a.video) and lines[0]["label"] != "x"


def _bad(args, match, code=2):
    """A bad invocation: one line, exit 2 for a usage error (``code``: 1 for a failure)."""
    r = CliRunner().invoke(main, [str(x) for x in args])
    assert r.exit_code == code, (args, r.exit_code, r.stderr)
    err = r.stderr.strip().splitlines()
    assert len(err) == 1, r.stderr
    assert err[0].startswith("hms-run: error: ") and match in err[0], err[0]


def test_text_file_as_checkpoint(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("these are my notes\n" * 20)
    _bad([assets().video, "--checkpoint", notes],
         f"{notes}: not a checkpoint (it is text, not a file written by torch.save)", 1)


def test_bad_options(tmp_path):
    a = assets()
    v, e, ck = a.video, a.engines, a.checkpoint
    _bad([v, "--engines", e, "--policy", "sometimes"], "unknown policy 'sometimes'")
    _bad([v, "--engines", e, "--policy", "every:0"], "KI must be an integer >= 1")
    _bad([v, "--engines", e, "--policy", "rates:0.1,0.5"], "must be <= PI")
    _bad([v, "--engines", e, "--budget-gflops", "0"], "budget must be a number of GMAC > 0")
    _bad([v, "--engines", e, "--budget-gmacs", "-1"], "budget must be a number of GMAC > 0")
    _bad([v, "--engines", e, "--budget-gflops", "1e-9"], "cannot afford one step (base")
    _bad([v, "--engines", e, "--steps", "0"], "steps must be an integer >= 1, got 0")
    _bad([v, "--engines", e, "--topk", "0"], "topk must be an integer >= 1")
    _bad([v, "--engines", e, "--batch-size", "0"], "--batch-size must be >= 1")
    _bad([v, "--engines", tmp_path / "nope"], "engines directory")
    _bad([v, "--engine", "torch"], "--engine torch needs --checkpoint")
    _bad([v, "--checkpoint", ck, "--engine", "onnx"], "--engine onnx runs an export dir")
    _bad([v, "--engines", e, "--checkpoint", ck], "not both")
    _bad([v, "--checkpoint", tmp_path / "missing.pt"], "checkpoint not found", 1)
    _bad([f"@{tmp_path / 'nolist.txt'}", "--engines", e], "list file")
    (tmp_path / "empty").mkdir()
    _bad([tmp_path / "empty", "--engines", e], "holds no video files")
    _bad([v, "--engines", e, "--device", "tpu"], "unknown device 'tpu'")
    if not torch.cuda.is_available():
        # a missing backend or GPU: the run could not start (exit 3, docs/commands.md)
        _bad([v, "--engines", e, "--device", "cuda"], "no CUDA device", 3)
        _bad([v, "--checkpoint", ck, "--device", "cuda:0"], "no CUDA device", 3)
    _bad([v, "--engines", e, "--output", tmp_path], "is a directory", code=3)  # output unusable: stopped
    # the options alone are checked before anything is loaded or looked up
    missing = tmp_path / "no-engines"
    _bad([v, "--engines", missing, "--policy", "sometimes"], "unknown policy 'sometimes'")
    _bad([v, "--engines", missing, "--steps", "0"], "steps must be an integer >= 1, got 0")
    _bad([v, "--engines", missing, "--budget-gflops", "-1"], "budget must be a number of GMAC")
    _bad([v, "--engines", missing, "--topk", "0"], "topk must be an integer >= 1")
    # a checkpoint given as --engines: the suggestion is a command that works
    _bad([v, "--engines", ck], f"'{ck}' is a file; run a checkpoint with --checkpoint {ck}, or "
         f"export it first with `hms-export --checkpoint {ck} --out engines/`")
    _bad([v, assets().long, "--engines", e, "--explain", tmp_path / "x.png"], "--explain draws one video")


def test_help():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for opt in ("--engines", "--checkpoint", "--engine", "--device", "--steps", "--budget-gflops",
                "--budget-gmacs", "--policy", "--online", "--json", "--output", "--topk", "--debug"):
        assert opt in r.stdout


def test_missing_video_is_an_error_line_not_a_crash(tmp_path):
    a = assets()
    r = run(tmp_path / "missing.mp4", a.video, "--engines", a.engines)
    assert r.exit_code == 1
    assert "missing.mp4" in r.stderr and "no such file" in r.stderr
    line = r.stderr.splitlines()[0]  # the path once, not "missing.mp4: missing.mp4:"
    assert line == f"hms-run: error: {tmp_path / 'missing.mp4'}: no such file", line
    assert r.stdout.startswith(f"{a.video}: ")


@pytest.mark.parametrize("flag", ["--progress", "--no-progress"])
def test_progress_bar_goes_to_stderr(tmp_path, flag):
    a = assets()
    r = run(a.video, "--engines", a.engines, "--json", flag, "--policy", "audio-only")
    assert r.exit_code == 0
    assert len(_json_lines(r.stdout)) == 1  # stdout stays clean JSON
    assert ("video/s" in r.stderr or "1/1" in r.stderr) == (flag == "--progress")


# ---------------------------------------------------------------- batch runs at scale (#16)


def test_scan_reports_what_it_skips(tmp_path):
    d = tmp_path / "d"
    videos = make_videos(d, 2)
    (d / "dangling.mp4").symlink_to(tmp_path / "gone.mp4")
    (d / "loop.mp4").symlink_to(d / "loop.mp4")
    (d / "dangling.txt").symlink_to(tmp_path / "gone.txt")
    other = make_videos(tmp_path / "elsewhere", 1)[0]
    (d / "linked").symlink_to(tmp_path / "elsewhere")  # a symlinked directory: followed
    (d / "linked" / "back").symlink_to(d)  # a loop back to the top: skipped
    (d / "alias.mp4").symlink_to(videos[0])  # the same file again: classified once (sorted:
    # alias.mp4 is met first, v00.mp4 is the duplicate)
    out = tmp_path / "r.jsonl"
    r = run(d, videos[1], "--engines", assets().engines, "--json", "--policy", "audio-only",
            "--output", out)
    assert r.exit_code == 1, r.stderr
    recs = {x["video"]: x for x in _json_lines(r.stdout)}
    assert set(recs) == {str(d / "dangling.mp4"), str(d / "loop.mp4"), str(d / "alias.mp4"),
                         str(videos[1]), str(d / "linked" / "v00.mp4")}
    assert recs[str(d / "dangling.mp4")]["error"].startswith("dangling symbolic link to '")
    assert "symbolic link loop" in recs[str(d / "loop.mp4")]["error"]
    assert recs[str(d / "linked" / "v00.mp4")]["label"]
    assert os.path.realpath(d / "linked" / "v00.mp4") == str(other)
    warnings = [x for x in r.stderr.splitlines() if "warning:" in x]
    assert len(warnings) == 4, r.stderr
    assert any("dangling.txt" in w and "dangling symbolic link" in w for w in warnings)
    assert any(f"'{d / 'linked' / 'back'}' leads to '{d}', already scanned" in w for w in warnings)
    assert any(f"'{videos[0]}' is the same file as '{d / 'alias.mp4'}'" in w for w in warnings)
    assert any(f"'{videos[1]}' given more than once" in w for w in warnings)
    assert "5 input(s): 3 classified, 2 failed, 4 scan warning(s)" in r.stderr
    assert len(_json_lines(out.read_text())) == 5


def test_symlink_loop_and_dangling_link_by_name(tmp_path):
    (tmp_path / "loop.mp4").symlink_to(tmp_path / "loop.mp4")
    (tmp_path / "d.mp4").symlink_to(tmp_path / "nowhere.mp4")
    r = run(tmp_path / "loop.mp4", tmp_path / "d.mp4", "--engines", assets().engines)
    assert r.exit_code == 1
    assert f"{tmp_path / 'loop.mp4'}: symbolic link loop" in r.stderr
    assert f"{tmp_path / 'd.mp4'}: dangling symbolic link to '{tmp_path / 'nowhere.mp4'}'" in r.stderr


def test_resume_keys_on_resolved_path_file_and_settings(tmp_path, monkeypatch):
    a = assets()
    vdir = tmp_path / "v"
    videos = make_videos(vdir, 2)
    out = tmp_path / "r.jsonl"
    base = ["--engines", a.engines, "--json", "--output", out, "--policy", "every:4"]
    r = run(*videos, *base)
    assert r.exit_code == 0, r.stderr
    # the same videos by another relative path: skipped
    monkeypatch.chdir(vdir)
    r = run("v00.mp4", "./v01.mp4", *base)
    assert r.exit_code == 0 and "2 video(s) already in" in r.stderr and r.stdout == ""
    # a file that changed (rewritten) is classified again, its record replaced
    videos[1].write_bytes(a.long.read_bytes())
    r = run(*videos, *base)
    assert r.exit_code == 0, r.stderr
    assert [x["video"] for x in _json_lines(r.stdout)] == [str(videos[1])]
    lines = _json_lines(out.read_text())
    assert len(lines) == 2 and lines[1]["source"]["size"] == a.long.stat().st_size
    # other settings: refused with one line naming them, exit 3, nothing written
    before = out.read_bytes()
    r = run(*videos, "--engines", a.engines, "--output", out, "--policy", "dense")
    assert r.exit_code == 3
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and 'policy "every:4" there, "dense" now' in err[0], r.stderr
    assert "--output-mode new" in err[0] and "2 input(s) not attempted" in err[0]
    assert out.read_bytes() == before
    r = run(*videos, "--engines", a.engines, "--output", out, "--steps", "8", "--json",
            "--policy", "every:4", "--output-mode", "new")
    assert r.exit_code == 0, r.stderr
    assert f"writing {tmp_path / 'r.1.jsonl'}" in r.stderr
    assert len(_json_lines((tmp_path / "r.1.jsonl").read_text())) == 2


def test_exit_code_3_when_the_output_is_locked_or_not_a_file(tmp_path):
    from hms_deploy.outputs import OutputLock

    a = assets()
    out = tmp_path / "r.jsonl"
    with OutputLock(tmp_path / "r.jsonl.lock", out, "hms-run"):
        r = run(a.video, "--engines", a.engines, "--output", out)
    assert r.exit_code == 3
    assert f"{out}: another hms-run is writing it (pid {os.getpid()})" in r.stderr
    assert "1 input(s) not attempted" in r.stderr
    (tmp_path / "a").write_text("x")
    r = run(a.video, "--engines", a.engines, "--output", tmp_path / "a" / "b.jsonl")
    assert r.exit_code == 3
    assert f"'{tmp_path / 'a'}' is a file, not a directory" in r.stderr
    assert "File exists" not in r.stderr


def test_a_second_writer_refuses_before_the_model_loads_by_any_name(tmp_path):
    """The lock comes first: with an export that cannot load, the lock error still wins;
    a symlink or ``..`` to the locked output is the same output."""
    from hms_deploy.runtime.results import ResultsFile

    a = assets()
    real = tmp_path / "cc.jsonl"
    (tmp_path / "link.jsonl").symlink_to(real)
    (tmp_path / "sub").mkdir()
    missing = tmp_path / "no-such-engines"
    with ResultsFile(real, settings={}):
        for name in (tmp_path / "link.jsonl", tmp_path / "sub" / ".." / "cc.jsonl"):
            r = run(a.video, "--engines", missing, "--output", name)
            assert r.exit_code == 3, r.stderr
            assert f"another hms-run is writing it (pid {os.getpid()}) on " in r.stderr
            assert "not found" not in r.stderr  # the export was never looked at
        r = run(a.video, "--engines", a.engines, "--output", tmp_path / "link.jsonl")
        assert r.exit_code == 3 and "another hms-run is writing it" in r.stderr
    assert real.read_text() == ""


def test_hard_links_to_one_video_are_one_input(tmp_path):
    from hms_deploy.cli.inputs import expand

    v = make_videos(tmp_path / "v", 1)[0]
    os.link(v, tmp_path / "v" / "w.mp4")
    inputs = expand([str(tmp_path / "v")])
    assert inputs.videos == [str(v)] and inputs.duplicates == 1
    assert inputs.warnings == [(f"'{tmp_path / 'v' / 'w.mp4'}' is the same file as '{v}': "
                               "classified once")]


# A shell's background job (e.g. a CI runner's) starts with SIGINT ignored, and a Python
# started so never raises KeyboardInterrupt: the child restores Python's SIGINT handler.
_RUN_WITH_SIGINT = ("import runpy, signal, sys; signal.signal(signal.SIGINT, "
                    "signal.default_int_handler); sys.argv[0] = 'hms-run'; "
                    "runpy.run_module('hms_deploy.cli.run', run_name='__main__')")


def _cli(args, **kw):
    return subprocess.Popen(
        [sys.executable, "-c", _RUN_WITH_SIGINT, *map(str, args)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw,
    )


def test_exit_code_3_on_a_full_disk(tmp_path):
    """RLIMIT_FSIZE makes writes to --output fail past 6 kB, as a full disk does."""
    import resource

    videos = make_videos(tmp_path / "v", 12)
    out = tmp_path / "r.jsonl"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))

    proc = _cli([tmp_path / "v", "--engines", assets().engines, "--output", out, "--no-progress",
                 "--policy", "audio-only"], preexec_fn=limit)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"hms-run: error: cannot write {out}: File too large; ")
    done = len(_json_lines(out.read_text()))  # every line complete
    assert 0 < done < 12 and out.read_text().endswith("\n")
    assert f"{12 - done} of 12 input(s) not attempted" in last
    r = run(tmp_path / "v", "--engines", assets().engines, "--output", out, "--policy", "audio-only")
    assert r.exit_code == 0 and f"{done} video(s) already in" in r.stderr
    assert sorted(x["video"] for x in _json_lines(out.read_text())) == [str(v) for v in videos]


@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted (SIGINT)"),
                                                   (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_signals_exit_130_143_and_say_what_is_left(tmp_path, sig, code, word):
    make_videos(tmp_path / "v", 20)
    out = tmp_path / "r.jsonl"
    proc = _cli([tmp_path / "v", "--engines", assets().engines, "--output", out, "--no-progress"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "finished before the signal"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    done = len(_json_lines(out.read_text()))
    assert 2 <= done < 20
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"hms-run: error: {word}; {20 - done} of 20 input(s) not attempted")
    assert f"rerun with the same --output {out} to resume" in last

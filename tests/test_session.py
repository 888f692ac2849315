"""The Python inference API: the record, error records, option checks, lifetime."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from runtime_helpers import (  # noqa: F401 - one_torch_thread is an autouse fixture
    STEPS,
    assets,
    one_torch_thread,
)

from hms_deploy.errors import BackendUnavailable, ConfigError
from hms_deploy.runtime import Session
from hms_deploy.runtime.timing import TIMING_KEYS

RECORD_KEYS = [
    "video", "label", "score", "topk", "steps", "decisions", "usage", "gflops", "has_audio",
    "warnings", "fallback", "engine", "device", "policy", "budget", "T", "export", "timing_ms",
]


@pytest.fixture(scope="module")
def onnx_session():
    with Session(engines_dir=assets().engines) as s:
        yield s


@pytest.fixture(scope="module")
def torch_session():
    with Session(checkpoint=assets().checkpoint) as s:
        yield s


def test_record_is_the_interfaces_record(onnx_session):
    a = assets()
    rec = onnx_session.classify(a.video)
    assert list(rec)[: len(RECORD_KEYS)] == RECORD_KEYS
    assert set(rec) - set(RECORD_KEYS) == {"stats", "coverage"}
    assert rec["warnings"] == [] and rec["fallback"] is None
    assert rec["video"] == str(a.video)
    assert isinstance(rec["label"], str) and rec["label"] in onnx_session.labels
    assert rec["topk"][0] == [rec["label"], rec["score"]]
    assert len(rec["topk"]) == 5 and all(isinstance(p, float) for _, p in rec["topk"])
    assert [p for _, p in rec["topk"]] == sorted((p for _, p in rec["topk"]), reverse=True)
    assert rec["steps"] == rec["T"] == STEPS
    assert set(rec["decisions"]) == {"appearance", "motion"}
    assert all(d in (0, 1) for v in rec["decisions"].values() for d in v)
    assert rec["gflops"]["unit"] == "GMAC" and 0 < rec["gflops"]["used"] < rec["gflops"]["dense"]
    assert rec["has_audio"] is True
    assert (rec["engine"], rec["device"], rec["policy"], rec["budget"]) == ("onnx", "cpu", "learned", None)
    manifest = (a.engines / "manifest.json").read_bytes()
    assert rec["export"] == hashlib.sha256(manifest).hexdigest()
    t = rec["timing_ms"]
    assert list(t) == list(TIMING_KEYS)
    assert all(isinstance(v, float) and v >= 0 for k, v in t.items() if k != "other")
    assert t["other"] == pytest.approx(t["total"] - sum(t[k] for k in TIMING_KEYS[1:-1]), abs=0.01)
    assert t["decode"] > 0 and t["audio"] > 0 and t["appearance"] > 0
    json.dumps(rec)  # plain JSON types only


def test_torch_record_names_the_checkpoint(torch_session):
    a = assets()
    rec = torch_session.classify(a.video, topk=2, policy="every:4")
    assert rec["engine"] == "torch" and rec["export"] is None
    assert rec["checkpoint"] == hashlib.sha256(a.checkpoint.read_bytes()).hexdigest()
    assert len(rec["topk"]) == 2 and rec["policy"] == "every:4"
    assert rec["stats"]["host_reads"] == 0  # a forced policy reads no decision


def test_classify_many_goes_on_after_errors(onnx_session, tmp_path):
    a = assets()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    videos = [a.video, tmp_path / "missing.mp4", bad, a.silent]
    recs = list(onnx_session.classify_many(videos))
    assert [r["video"] for r in recs] == [str(v) for v in videos]
    assert "error" not in recs[0] and "error" not in recs[3]
    assert set(recs[1]) == set(recs[2]) == {"video", "error"}
    assert "no such file" in recs[1]["error"]
    assert str(bad) in recs[2]["error"] and "\n" not in recs[2]["error"]
    # in a lockstep batch, a failing video is isolated and the others still finish
    recs = list(onnx_session.classify_many(videos, batch_size=4))
    assert ["error" in r for r in recs] == [False, True, True, False]


def test_options_are_checked_before_any_video(onnx_session):
    never = iter(())  # a generator would not even start: errors come at the call
    for kwargs, match in [
        ({"policy": "sometimes"}, "unknown policy 'sometimes'"),
        ({"policy": "rates:0.1,0.2"}, "PM .* must be <= PI"),
        ({"budget": 0}, "budget must be a number of GMAC > 0"),
        ({"budget": -3}, "budget must be a number of GMAC > 0"),
        ({"budget": 1e-9}, "cannot afford one step"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"topk": 0}, "topk must be an integer >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ]:
        with pytest.raises(ConfigError, match=match):
            onnx_session.classify_many(never, **kwargs)


def test_session_errors(tmp_path):
    a = assets()
    with pytest.raises(ConfigError, match="engines directory .* not found"):
        Session(engines_dir=tmp_path / "nope")
    with pytest.raises(ConfigError, match="engine torch needs checkpoint"):
        Session(engine="torch")
    with pytest.raises(ConfigError, match="not both"):
        Session(engines_dir=a.engines, checkpoint=a.checkpoint)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="no CUDA device"):
            Session(checkpoint=a.checkpoint, device="cuda")
    with pytest.raises(ConfigError, match="unknown device"):
        Session(checkpoint=a.checkpoint, device="tpu")


def test_session_opens_on_first_use_and_closes():
    s = Session(checkpoint=assets().checkpoint)
    assert s.steps == STEPS and len(s.labels) == 6
    rec = s.classify(assets().video, policy="audio-only")
    assert rec["usage"] == {"appearance": 0, "motion": 0}
    s.close()
    s.close()  # idempotent


def _swap_when_open(video, replacement, swapped: list[float]):
    """A thread that replaces ``video`` by ``replacement`` (an atomic ``mv``) as soon as
    this process has ``video`` open, i.e. while its run is in progress."""
    import os
    import threading
    import time

    target = os.path.realpath(video)

    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for fd in os.listdir("/proc/self/fd"):
                try:
                    if os.readlink(f"/proc/self/fd/{fd}") == target:
                        os.replace(replacement, video)
                        swapped.append(time.monotonic())
                        return
                except OSError:
                    continue
            time.sleep(0.001)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("batch_size", [1, 4])
def test_a_file_replaced_while_it_runs_gets_an_error_record(onnx_session, tmp_path, batch_size):
    """X is swapped for Y by an atomic mv while X runs (in a lockstep batch of 4, and
    alone): X gets an error record that says so, never X's start mixed with Y's frames."""
    import shutil
    import time

    a = assets()
    videos = [tmp_path / f"v{i}.mp4" for i in range(batch_size)]
    for v in videos:
        shutil.copy(a.video, v)
    x = videos[-1]
    y = tmp_path / "y.tmp"
    shutil.copy(a.long, y)
    swapped: list[float] = []
    t = _swap_when_open(x, y, swapped)
    recs = list(onnx_session.classify_many(videos, batch_size=batch_size, steps=STEPS))
    ended = time.monotonic()
    t.join(timeout=5)
    assert swapped and swapped[0] < ended, "the swap did not happen during the run"
    assert [r["video"] for r in recs] == [str(v) for v in videos]
    assert "label" not in recs[-1]
    assert recs[-1]["error"] == (f"{x}: the file was replaced (another inode) while it was "
                                 "classified; no result from a mix of two files: run it again")
    assert all("label" in r for r in recs[:-1])  # the others of the batch are unharmed
    rerun = onnx_session.classify(x, steps=STEPS)  # the new file, stable now: a result
    assert rerun["label"] and "error" not in rerun

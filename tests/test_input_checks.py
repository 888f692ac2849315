"""Inputs the paper never sees (docs/method.md §9), each made in the test: not a video, a
truncated file, too few distinct inputs, no audio track (the fallback), digital silence."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner
from hostile_media import faststart_cut, image_as_mp4, video
from runtime_helpers import STEPS, assets, one_torch_thread  # noqa: F401 - autouse fixture

from hms_deploy.cli.run import main as run_main
from hms_deploy.data.checks import truncation
from hms_deploy.data.video import probe
from hms_deploy.errors import ConfigError, VideoError
from hms_deploy.runtime.session import Session


@pytest.fixture(scope="module")
def session():
    s = Session(engines_dir=assets().engines).open()
    yield s
    s.close()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    return {
        "png": image_as_mp4(d / "image.mp4"),
        "cut": faststart_cut(d / "cut.mp4"),
        "short": video(d / "short.mp4", duration_s=0.3),
        "sixty": video(d / "sixty.mp4", duration_s=2.0, fps=30.0),
        "noaudio": video(d / "noaudio.mp4", audio="none"),
        "silence": video(d / "silence.mp4", audio="silence"),
    }


def cli(*args):
    return CliRunner().invoke(run_main, [str(a) for a in args])


def test_image_renamed_mp4_is_refused(session, media):
    with pytest.raises(VideoError, match=r"image\.mp4: not a video \(its video stream has 1 frame"):
        session.classify(media["png"])
    r = cli(media["png"], "--engines", assets().engines)
    assert r.exit_code == 1
    err = r.stderr.strip().splitlines()[0]
    assert err.startswith("hms-run: error: ") and err.count(str(media["png"])) == 1, err


@pytest.mark.parametrize("policy", ["learned", "dense", "audio-only"])
def test_truncated_file_fails_under_every_policy(session, media, policy):
    info = probe(media["cut"])
    end, declared = truncation(info)
    assert declared == pytest.approx(10.0, abs=0.1) and 4.0 < end < 7.0
    msg = rf"cut\.mp4: truncated file: its streams end at {end:.2f} s but the container " \
          rf"declares {declared:.2f} s"
    with pytest.raises(VideoError, match=msg):
        session.classify(media["cut"], policy=policy)
    rec = session.classify(media["cut"], policy=policy, allow_truncated=True)
    assert rec["steps"] == STEPS
    assert len(rec["warnings"]) == 1
    m = re.fullmatch(rf"truncated file: classified the decodable (\d+\.\d\d) s of the declared "
                     rf"{declared:.2f} s", rec["warnings"][0])
    assert m and 4.0 < float(m.group(1)) <= end + 0.005, rec["warnings"]


def test_truncation_rule_needs_both_margins(media):
    whole = probe(media["sixty"])
    assert truncation(whole) is None  # a complete file
    assert whole.declared_duration_s == pytest.approx(whole.streams_end_s, abs=0.1)


def test_truncated_file_on_the_command_line(media):
    e = assets().engines
    r = cli(media["cut"], "--engines", e, "--policy", "audio-only")
    assert r.exit_code == 1 and "truncated file" in r.stderr and "declares 10.00 s" in r.stderr
    r = cli(media["cut"], "--engines", e, "--policy", "audio-only", "--allow-truncated")
    assert r.exit_code == 0, r.stderr
    assert "  warning: truncated file: classified the decodable" in r.stdout


def test_short_clip_warns_about_repeated_frames(session, media):
    n = probe(media["short"]).num_frames
    assert n < STEPS
    rec = session.classify(media["short"])
    assert rec["warnings"] == [f"T={STEPS} steps but only {n} distinct frames: steps repeat frames"]
    assert rec["fallback"] is None


def test_steps_outnumber_frames_warns_in_record_and_text(session, media):
    assert probe(media["sixty"]).num_frames == 60
    assert session.classify(media["sixty"], policy="audio-only")["warnings"] == []
    rec = session.classify(media["sixty"], steps=200, policy="audio-only")
    assert "T=200 steps but only 60 distinct frames: steps repeat frames" in rec["warnings"]
    r = cli(media["sixty"], "--engines", assets().engines, "--steps", "200", "--policy", "audio-only")
    assert r.exit_code == 0, r.stderr
    assert "  warning: T=200 steps but only 60 distinct frames" in r.stdout


def test_no_audio_runs_the_fallback_policy(session, media):
    v = media["noaudio"]
    rec = session.classify(v)
    assert rec["has_audio"] is False and rec["fallback"] == "no_audio"
    assert rec["policy"] == "learned"
    assert len(rec["warnings"]) == 1 and rec["warnings"][0].startswith(
        "no audio track: the learned gates need audio; ran the no-audio policy dense-appearance")
    assert rec["decisions"]["appearance"] == [1] * STEPS
    # the appearance gate never ran; the motion gate ran once per step (appearance ran)
    assert rec["stats"]["host_reads"] == STEPS
    assert rec["stats"]["engine_calls"]["appearance_gate"] == 0
    assert rec["stats"]["engine_calls"]["motion_gate"] == STEPS
    same = session.classify(v, policy="dense-appearance")  # the same plan, asked for
    assert same["decisions"] == rec["decisions"] and same["label"] == rec["label"]
    assert same["fallback"] is None  # nothing was replaced
    why = "no audio track: the audio path sees silence (policy dense-appearance is also the "
    assert same["warnings"] == [why + "no-audio policy)"]
    other = session.classify(v, no_audio_policy="audio-only")
    assert other["usage"] == {"appearance": 0, "motion": 0} and other["fallback"] == "no_audio"
    with pytest.raises(VideoError, match=r"noaudio\.mp4: no audio track \(refused by "):
        session.classify(v, no_audio_policy="error")
    forced = session.classify(v, policy="dense")  # no gate consulted: no fallback
    assert forced["fallback"] is None and forced["usage"] == {"appearance": STEPS, "motion": STEPS}
    assert forced["warnings"] == ["no audio track: the audio path sees silence (policy dense needs no gate)"]


def test_digital_silence_is_audio(session, media):
    rec = session.classify(media["silence"])
    assert rec["has_audio"] is True and rec["fallback"] is None and rec["warnings"] == []
    assert rec["stats"]["engine_calls"]["appearance_gate"] == STEPS  # the gates decided


def test_lockstep_batch_mixes_videos_with_and_without_audio(session, media):
    videos = [assets().video, media["noaudio"], media["silence"]]
    single = [session.classify(v) for v in videos]
    batched = list(session.classify_many(videos, batch_size=3))
    assert [r["stats"]["batch"] for r in batched] == [3, 3, 3]
    assert [r["fallback"] for r in batched] == [None, "no_audio", None]
    for s, b in zip(single, batched):
        assert b["decisions"] == s["decisions"] and b["label"] == s["label"]
        assert b["warnings"] == s["warnings"]
        assert b["score"] == pytest.approx(s["score"], abs=1e-5)


def test_no_audio_policy_option(media, tmp_path):
    e = assets().engines
    r = cli(media["noaudio"], "--engines", e, "--no-audio-policy", "error")
    assert r.exit_code == 1 and "no audio track (refused by --no-audio-policy error)" in r.stderr
    r = cli(media["noaudio"], "--engines", e, "--json", "--no-audio-policy", "every:4")
    assert r.exit_code == 0, r.stderr
    assert '"fallback": "no_audio"' in r.stdout and '"appearance": [1, 0, 0, 0, 1' in r.stdout
    # a bad value is a usage error found before the engines are looked at
    r = cli(media["noaudio"], "--engines", tmp_path / "absent", "--no-audio-policy", "never")
    assert r.exit_code == 2
    assert re.fullmatch(r"hms-run: error: no-audio policy: unknown policy 'never'.* or 'error'",
                        r.stderr.strip())
    with pytest.raises(ConfigError, match="no-audio policy"):
        Session(engines_dir=e).options(no_audio_policy="sometimes")


def test_extraction_refuses_images_and_truncated_files(media):
    from hms_deploy.config import tiny_config
    from hms_deploy.data.extraction import prepare_video

    cfg = tiny_config(6)
    with pytest.raises(VideoError, match="not a video"):
        prepare_video(media["png"], cfg, 4)
    with pytest.raises(VideoError, match="truncated file: its streams end at"):
        prepare_video(media["cut"], cfg, 4)
    assert prepare_video(media["short"], cfg, 4).mel.shape[0] == 4

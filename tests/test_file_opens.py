"""How often a video's file is opened, and what a reader of the probe's container decodes.

The probe's container is read for the frames (after a seek back to the first frame) and a
second container decodes the audio, so a video is opened at most twice; the frames are
those of a fresh container. Opens are counted by wrapping PyAV's ``av.open`` (a
third-party call, observed, not replaced).
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from hostile_media import faststart_cut, index_last_cut, video
from runtime_helpers import assets, one_torch_thread  # noqa: F401 - autouse fixture

from hms_deploy.config import tiny_config
from hms_deploy.data.extraction import prepare_video
from hms_deploy.data.frame_source import FrameSource
from hms_deploy.data.frame_walk import seek_to
from hms_deploy.data.inputs import VideoInputs
from hms_deploy.data.synthetic import write_video
from hms_deploy.data.video import probe, probe_open
from hms_deploy.errors import VideoError
from hms_deploy.runtime.session import Session

W, H, BITS = 160, 64, 10


def index_frame(i: int, t: float = 0.0) -> np.ndarray:
    bits = (i >> np.arange(BITS)) & 1
    row = np.repeat(bits * 255, W // BITS).astype(np.uint8)
    return np.repeat(np.broadcast_to(row[None, :, None], (1, W, 3)), H, axis=0).copy()


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("opens")
    return {
        "tone": video(d / "tone.mp4", duration_s=3.0),
        "gop30": write_video(d / "gop30.mp4", duration_s=4.0, fps=30, size=(W, H),
                             frame_fn=index_frame, gop=30),
        "cut": faststart_cut(d / "cut.mp4"),
        "index_cut": index_last_cut(d / "index_cut.mp4"),
    }


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths ``av.open`` is called with while the test runs."""
    seen: list[str] = []
    real = av.open

    def counting(file, *args, **kwargs):
        seen.append(str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(av, "open", counting)
    return seen


@pytest.fixture(scope="module")
def session():
    s = Session(engines_dir=assets().engines).open()
    yield s
    s.close()


@pytest.mark.parametrize("policy", ["learned", "dense", "rates:0.5,0.3", "audio-only"])
def test_a_video_is_opened_at_most_twice_per_run(session, media, opens, policy):
    rec = session.classify(media["tone"], steps=6, policy=policy)
    assert "error" not in rec
    assert opens.count(str(media["tone"])) <= 2, opens


def test_a_batch_opens_each_video_at_most_twice(session, media, opens):
    videos = [media["tone"], media["gop30"]]
    recs = list(session.classify_many(videos, steps=5, policy="dense", batch_size=2))
    assert [("error" in r) for r in recs] == [False, False]
    for v in videos:
        assert opens.count(str(v)) <= 2, opens


def test_a_truncated_file_classified_anyway_is_opened_at_most_twice(session, media, opens):
    rec = session.classify(media["cut"], steps=4, policy="dense", allow_truncated=True)
    assert rec["warnings"] and opens.count(str(media["cut"])) <= 2, opens


def test_decoding_every_input_opens_twice(media, opens):
    prepare_video(media["tone"], tiny_config(4), 4)
    assert opens.count(str(media["tone"])) == 2, opens
    opens.clear()
    VideoInputs(media["tone"], tiny_config(4), 4).decode_all()
    assert opens.count(str(media["tone"])) == 2, opens


def test_frames_of_the_probe_container_equal_a_fresh_one(media, opens):
    path = media["gop30"]
    info = probe(path)
    every = list(range(info.num_frames))
    with FrameSource(info, cache_frames=0) as fresh:
        want = fresh.read(every)
    opens.clear()
    for opts in ({}, {"read_ahead": 4}, {"read_ahead": 4, "read_ahead_bytes": 2**30}):
        with FrameSource(path, cache_frames=0, **opts) as src:  # probed: one open
            if "read_ahead_bytes" in opts:
                src.expect(every)
            got = src.read(every)
        assert sorted(got) == every
        for i in every:
            np.testing.assert_array_equal(got[i], want[i])
        assert opens.count(str(path)) == 1, opens
        opens.clear()


class _RewindsLate(FrameSource):
    """A reader whose seek back to the first frame lands one keyframe late."""

    def open(self):
        rewinding = self._container is None and self._probed is not None
        super().open()
        if rewinding and self._rewound:
            seek_to(self._container, self._stream, self.info.frame_pts,
                    int(self.info.keyframe_indices[1]))
            self._frames = self._decode_iter()
        return self


def test_a_rewind_that_lands_late_reads_a_fresh_container(media, opens):
    path = media["gop30"]
    with FrameSource(probe(path), cache_frames=0) as fresh:
        want = fresh.read([0, 5, 40])
    opens.clear()
    with _RewindsLate(probe_open(path), cache_frames=0) as src:
        got = src.read([0, 5, 40])
    for i in (0, 5, 40):
        np.testing.assert_array_equal(got[i], want[i])
    assert opens.count(str(path)) == 2, opens  # the probe's container, then a fresh one


def test_a_file_cut_before_its_index_says_so(media):
    with pytest.raises(VideoError) as e:
        probe(media["index_cut"])
    msg = str(e.value)
    assert msg.startswith(f"{media['index_cut']}: truncated or damaged MP4 file"), msg
    assert "moov" in msg and "Errno" not in msg and "1094995529" not in msg, msg

"""Read-ahead decoding and frame skipping: same frames as before, bounded, clean shutdown."""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
from runtime_helpers import assets, one_torch_thread  # noqa: F401 - autouse fixture

from hms_deploy.config import tiny_config
from hms_deploy.data.decode_thread import ReadAhead
from hms_deploy.data.frame_source import FrameSource
from hms_deploy.data.synthetic import write_video
from hms_deploy.data.video import probe
from hms_deploy.errors import VideoError
from hms_deploy.runtime.frames import DecodeOptions, open_video
from hms_deploy.runtime.policy import parse_policy

W, H, BITS = 160, 64, 10


def index_frame(i: int, t: float = 0.0) -> np.ndarray:
    bits = (i >> np.arange(BITS)) & 1
    row = np.repeat(bits * 255, W // BITS).astype(np.uint8)
    return np.repeat(np.broadcast_to(row[None, :, None], (1, W, 3)), H, axis=0).copy()


def read_index(rgb: np.ndarray) -> int:
    bw = rgb.shape[1] // BITS
    means = [rgb[8:-8, b * bw + 4 : (b + 1) * bw - 4].mean() for b in range(BITS)]
    return int(sum(1 << b for b, m in enumerate(means) if m > 128))


def wait_until(done, tries: int = 300) -> None:
    """Poll ``done()`` every 10 ms until it holds (bounded: the assertions that follow
    say whether it did)."""
    for _ in range(tries):
        if done():
            return
        time.sleep(0.01)


def decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hms-")]


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("decode_media")
    files = {
        # x264 with B-frames (non-reference ones among them), keyframe every 30 frames
        "gop30": write_video(d / "gop30.mp4", duration_s=8.0, fps=30, size=(W, H),
                             frame_fn=index_frame, gop=30),
        # x264's default keyframe placement: one keyframe (long GOP)
        "long": write_video(d / "long.mp4", duration_s=8.0, fps=30, size=(W, H),
                            frame_fn=index_frame),
    }
    # a damaged copy: the second half of the media data (mdat box) overwritten with garbage
    data = bytearray(files["gop30"].read_bytes())
    pos = 0
    while data[pos + 4 : pos + 8] != b"mdat":
        pos += int.from_bytes(data[pos : pos + 4], "big")
    size = int.from_bytes(data[pos : pos + 4], "big")
    rng = np.random.default_rng(0)
    a, b = pos + 8 + size // 2, pos + 8 + size * 3 // 4
    data[a:b] = rng.integers(0, 256, b - a, dtype=np.uint8).tobytes()
    (d / "damaged.mp4").write_bytes(bytes(data))
    files["damaged"] = d / "damaged.mp4"
    return files


def full_decode(path: Path) -> dict[int, np.ndarray]:
    """The oracle: every frame decoded and converted, by its presentation index."""
    info = probe(path)
    index = {int(p): i for i, p in enumerate(info.frame_pts.tolist())}
    out = {}
    with av.open(str(path)) as c:
        for f in c.decode(c.streams.video[0]):
            out[index[int(f.pts)]] = f.to_ndarray(format="rgb24")
    return out


REQUESTS = [  # sequences of reads, as the step loop makes them (forward, look-backs, jumps)
    [[3], [20, 21, 22], [10, 11], [95], [140, 141], [200], [60], [239]],
    [[0, 1, 2, 3, 4, 5, 6, 7], [40], [33, 34, 35, 36], [41], [120], [125], [180], [238]],
]
OPTIONS = [
    {"read_ahead": 0},
    {"read_ahead": 4},
    {"read_ahead": 32, "retain_frames": 48},
    {"read_ahead": 0, "retain_frames": 48, "seek_threshold": 0},
    # with a plan (skip): the thread hands over only the frames reads can use
    {"read_ahead": 4, "read_ahead_bytes": 2**30},
    {"read_ahead": 4, "read_ahead_bytes": 1, "retain_frames": 48},
]


@pytest.mark.parametrize("name", ["gop30", "long"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("skip", [False, True], ids=["all", "skip"])
def test_frames_are_bit_identical_to_a_full_decode(media, name, opts, skip):
    oracle = full_decode(media[name])
    for requests in REQUESTS:
        with FrameSource(media[name], cache_frames=8, **opts) as src:
            if skip:
                src.expect([i for r in requests for i in r])
            for r in requests:
                got = src.read(r)
                assert sorted(got) == sorted(set(r))
                for i in r:
                    np.testing.assert_array_equal(got[i], oracle[i])
                    assert read_index(got[i]) == i
            st = src.stats
        assert st.substituted == 0
        n = sum(len(r) for r in requests)
        if skip and opts["read_ahead"]:  # the thread converts expected frames it passes;
            converted = st.frames_converted + st.frames_converted_ahead
            assert st.frames_converted_ahead > 0
            assert converted <= 3 * n  # a backward seek may pass them again
        else:
            assert st.frames_converted <= n
        if skip:  # sparse requests: the non-reference frames between them were not decoded
            assert st.frames_skipped > 0 and st.frames_decoded < st.frames_walked
        else:
            assert st.frames_skipped <= 16  # only frames in flight at a seek or close
    assert decode_threads() == []


def test_skipping_decodes_fewer_frames_and_the_same_pixels(media):
    info = probe(media["long"])
    wanted = list(range(0, info.num_frames, 15))
    with FrameSource(info, cache_frames=0) as a:
        fa = a.read(wanted)
    with FrameSource(info, cache_frames=0) as b:
        b.expect(wanted)
        fb = b.read(wanted)
    assert a.stats.seeks == b.stats.seeks == 0
    assert a.stats.frames_skipped <= 4  # frames still in the decoder (reorder delay)
    assert b.stats.frames_walked >= a.stats.frames_walked - 4  # same walk (to frame 225)
    assert b.stats.frames_decoded < 0.8 * a.stats.frames_decoded  # non-reference B-frames
    for i in wanted:
        np.testing.assert_array_equal(fa[i], fb[i])


def test_expect_must_come_before_the_first_read(media):
    with FrameSource(media["gop30"]) as src:
        src.read([5])
        with pytest.raises(RuntimeError, match="expect\\(\\) must come before the first read"):
            src.expect([5, 6])


def test_read_ahead_is_bounded_and_stops_on_close(media):
    info = probe(media["long"])
    with FrameSource(info, read_ahead=8, cache_frames=0) as src:
        src.read([10])
        assert len(decode_threads()) == 1
        # let the thread fill its queue (bounded wait)
        wait_until(lambda: src.stats.frames_decoded >= 10 + 1 + 8)
        time.sleep(0.05)
        # consumed 11 frames (0..10); at most 8 decoded ahead, +1 in the decoder's hand
        assert 11 <= src.stats.frames_decoded <= 11 + 8 + 1
    assert decode_threads() == []  # closed mid-stream: the thread is joined
    assert src.stats.frames_decoded < info.num_frames


def test_read_ahead_pauses_where_the_reader_will_seek(media):
    info = probe(media["gop30"])  # keyframes every 30 frames
    wanted = [5, 200]  # after 5 the reader seeks to keyframe 180: decoding on is waste
    with FrameSource(info, read_ahead=64, cache_frames=0) as src:
        src.expect(wanted)
        assert read_index(src.read([5])[5]) == 5
        time.sleep(0.2)
        ahead = src.stats.frames_walked
        assert read_index(src.read([200])[200]) == 200
        assert src.stats.seeks == 1
    assert ahead <= 5 + 1 + 4  # paused right after frame 5 (+ the decoder's reorder delay)


def test_damaged_stream_behaves_the_same_with_read_ahead(media):
    info = probe(media["damaged"])
    wanted = list(range(0, info.num_frames, 7))

    def outcome(**opts):
        try:
            with FrameSource(info, cache_frames=0, **opts) as src:
                frames = src.read(wanted)
                return "ok", {i: f.copy() for i, f in frames.items()}, src.stats.substituted
        except VideoError as e:
            return "error", str(e), None

    plain = outcome()
    for opts in ({"read_ahead": 4}, {"read_ahead": 64}):
        assert_same_outcome(outcome(**opts), plain, wanted)
        assert decode_threads() == []


def assert_same_outcome(got, plain, wanted):
    """("ok", frames, substituted) or ("error", message, None): equal, frame by frame."""
    assert got[0] == plain[0]
    if plain[0] == "ok":
        assert got[2] == plain[2]
        for i in wanted:
            np.testing.assert_array_equal(got[1][i], plain[1][i])
    else:
        assert got[1] == plain[1]


def planned(info, **opts):
    return FrameSource(info, cache_frames=0, read_ahead=4, read_ahead_bytes=2**30, **opts)


def test_planned_read_ahead_runs_ahead_in_usable_frames_only(media):
    info = probe(media["long"])  # one keyframe: nothing to pause for
    frame_bytes = info.width * info.height * 3 // 2 + info.width * info.height * 3
    wanted = list(range(0, info.num_frames, 30))
    with FrameSource(info, cache_frames=0, read_ahead=1,
                     read_ahead_bytes=2 * frame_bytes) as src:
        src.expect(wanted)
        assert read_index(src.read([0])[0]) == 0
        wait_until(lambda: src.stats.frames_walked >= 60)
        time.sleep(0.1)
        walked = src.stats.frames_walked
        # two expected frames (30, 60) fit: the thread walked past ~60 frames it did
        # not hand over, where a count of decoded frames would have stopped it at 1
        assert 60 <= walked <= 90 + 8
        got = src.read(wanted[1:])
        assert [read_index(got[i]) for i in wanted[1:]] == wanted[1:]
        assert src.stats.frames_converted_ahead == len(wanted)
        assert src.stats.frames_converted == 0 and src.stats.substituted == 0
    assert decode_threads() == []


def test_planned_read_ahead_seeks_where_the_reader_would(media):
    info = probe(media["gop30"])  # keyframes every 30 frames
    with planned(info) as src:
        src.expect([5, 200, 201])
        assert read_index(src.read([5])[5]) == 5
        # the thread seeks to keyframe 180 and converts 200, 201
        wait_until(lambda: src.stats.frames_converted_ahead >= 3)
        assert src.stats.frames_converted_ahead == 3
        assert src.stats.seeks == 0  # counted when the reader takes the seek
        got = src.read([200, 201])
        assert [read_index(got[i]) for i in (200, 201)] == [200, 201]
        st = src.stats
        assert st.seeks == 1 and st.frames_converted == 0
        assert st.frames_walked <= 6 + 4 + 22 + 4  # 0..5 (+ reorder delay), then 180..201
    assert decode_threads() == []


@pytest.mark.parametrize("name", ["gop30", "long"])
def test_planned_read_ahead_serves_reads_outside_the_plan_like_the_plain_reader(media, name):
    info = probe(media[name])
    plan = [5, 40, 41, 42, 120, 200]
    reads = [[5], [17], [40, 41], [42, 60], [33], [120], [130, 131], [200], [239]]

    def run(src):
        with src:
            src.expect(plan)
            got = [src.read(r) for r in reads]
            return got, src.stats.substituted

    plain, plain_sub = run(FrameSource(info, cache_frames=0))
    got, sub = run(planned(info))
    assert sub == plain_sub
    for a, b in zip(got, plain):
        assert sorted(a) == sorted(b)
        for i in a:
            np.testing.assert_array_equal(a[i], b[i])
    assert decode_threads() == []


def test_planned_read_ahead_on_a_damaged_stream_matches_the_plain_reader(media):
    info = probe(media["damaged"])
    wanted = list(range(0, info.num_frames, 7)) + [info.num_frames - 1]

    def outcome(src):
        try:
            with src:
                src.expect(wanted)
                frames = src.read(wanted)
                return "ok", {i: f.copy() for i, f in frames.items()}, src.stats.substituted
        except VideoError as e:
            return "error", str(e), None

    plain = outcome(FrameSource(info, cache_frames=0))
    got = outcome(planned(info))
    if plain[0] == "ok":
        assert plain[2] > 0  # the damage made substitutes: they are the same frames
    assert_same_outcome(got, plain, wanted)
    assert decode_threads() == []


# -- ReadAhead itself ------------------------------------------------------------------


def test_read_ahead_hands_over_items_then_the_error_once():
    closed = []

    def source():
        try:
            yield from range(5)
            raise av.InvalidDataError(1094995529, "invalid data at frame 5")
        finally:
            closed.append(threading.current_thread().name)

    ra = ReadAhead(source(), 2, name="hms-test")
    assert [next(ra) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(av.InvalidDataError, match="invalid data at frame 5"):
        next(ra)
    with pytest.raises(StopIteration):
        next(ra)
    ra.close()
    assert closed == ["hms-test"]  # the generator's cleanup ran in the producer thread
    assert decode_threads() == []


def test_read_ahead_close_mid_stream_and_before_start():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    ra = ReadAhead(endless(), 3, name="hms-test")
    assert next(ra) == 0
    wait_until(lambda: len(produced) >= 4)
    time.sleep(0.05)
    assert len(produced) <= 1 + 3 + 1  # bounded: consumed 1, queue 3, 1 in hand
    ra.close()
    assert not ra.running and decode_threads() == []
    with pytest.raises(StopIteration):
        next(ra)

    never = ReadAhead(endless(), 3, name="hms-test")  # closed before any next()
    never.close()
    assert not never.running and decode_threads() == []
    with pytest.raises(StopIteration):
        next(never)


def test_unclosed_read_ahead_stops_when_collected():
    def endless():
        while True:
            yield 0

    ra = ReadAhead(endless(), 2, name="hms-test-gc")
    next(ra)
    assert [t.name for t in decode_threads()] == ["hms-test-gc"]
    del ra
    gc.collect()
    wait_until(lambda: not decode_threads())
    assert decode_threads() == []


def test_read_ahead_bounds_the_weight_of_queued_items():
    produced = []

    def source():
        for i in range(100):
            produced.append(i)
            yield i

    # odd items weigh 3, even ones 0 (markers): the queue holds at most 4 units
    ra = ReadAhead(source(), 4, name="hms-test", weight=lambda i: 3 * (i % 2))
    assert next(ra) == 0
    wait_until(lambda: len(produced) >= 4)
    time.sleep(0.05)
    # queued: 1, 2, 3 (weight 6 >= 4 after 3), + 1 in the producer's hand
    assert 4 <= len(produced) <= 5
    assert list(ra) == list(range(1, 100))  # every item, in order
    ra.close()
    assert decode_threads() == []


def test_read_ahead_rejects_zero_capacity():
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        ReadAhead(iter([]), 0)


# -- the runtime: same inputs and the same records -------------------------------------


def test_video_inputs_are_identical_with_and_without_read_ahead_and_skipping():
    a = assets()
    cfg = tiny_config(6)
    steps = 16
    plan_a, plan_m = parse_policy("rates:0.5,0.25").plan(steps)

    def inputs(opts: DecodeOptions) -> tuple[list[np.ndarray], dict[str, int]]:
        vi = open_video(a.long, cfg, steps, decode=opts)
        try:
            vi.plan(plan_a, plan_m)
            out = []
            for t in range(steps):
                if plan_a[t]:
                    out.append(vi.appearance(t))
                if plan_m[t]:
                    out.append(vi.motion(t))
            assert vi.source is not None
            return out, {**vi.decode_stats, "derived": vi.source.stats.frames_derived_ahead}
        finally:
            vi.close()

    ref, ref_stats = inputs(DecodeOptions(read_ahead=0, skip_nonref=False))
    assert ref_stats["derived"] == 0
    for opts in (DecodeOptions(), DecodeOptions(read_ahead=2), DecodeOptions(skip_nonref=False),
                 DecodeOptions(read_ahead=0), DecodeOptions(plan_ahead=False)):
        got, stats = inputs(opts)
        assert len(got) == len(ref)
        for x, y in zip(got, ref):
            np.testing.assert_array_equal(x, y)
        assert stats["frames_converted"] == ref_stats["frames_converted"]
        # with the planned read-ahead (the default), the thread resized and cropped the
        # frames the steps wanted (the same function: the inputs above are bit-identical)
        if opts == DecodeOptions():
            assert stats["derived"] > 0
        else:
            assert stats["derived"] == 0
    assert decode_threads() == []


@pytest.mark.parametrize(("policy", "budget_steps"), [
    ("learned", None), ("rates:0.5,0.25", None), ("dense", None), ("audio-only", None),
    ("dense", 5),  # the budget runs out after 5 dense steps: an early stop mid-video
])
def test_records_are_identical_with_and_without_the_new_decoder(policy, budget_steps):
    from hms_deploy.costs import dense_cost
    from hms_deploy.runtime.session import Session

    a = assets()
    with Session(checkpoint=a.checkpoint) as s:
        budget = None
        if budget_steps is not None:
            budget = dense_cost(s.engine_set.costs, budget_steps) * 1.001
        base = s.options(policy=policy, budget=budget)
        recs = {}
        for name, dec in (("before", DecodeOptions(read_ahead=0, skip_nonref=False)),
                          ("after", DecodeOptions())):
            (rec,) = list(s.classify_many([a.long], options=replace(base, decode=dec)))
            assert "error" not in rec
            recs[name] = rec
    before, after = recs["before"], recs["after"]
    for key in ("label", "score", "topk", "decisions", "usage", "gflops", "steps"):
        assert after[key] == before[key], key
    for key in ("appearance_frames", "motion_clips", "seeks"):
        assert after["stats"][key] == before["stats"][key], key
    if budget_steps is not None:
        assert after["steps"] < after["T"]  # stopped early; its decode thread is gone
    if policy == "audio-only":
        assert after["stats"]["frames_walked"] == 0
    if policy == "rates:0.5,0.25":
        assert after["stats"]["frames_decoded"] < before["stats"]["frames_decoded"]
    assert decode_threads() == []


def test_a_forced_plan_starts_decoding_before_the_first_read():
    a = assets()
    cfg = tiny_config(6)
    plan_a, plan_m = parse_policy("rates:0.5,0.25").plan(16)
    vi = open_video(a.long, cfg, 16)
    try:
        vi.plan(plan_a, plan_m)
        vi.start_decoding()
        assert vi.source is not None
        # the thread decodes while nobody reads
        wait_until(lambda: vi.source.stats.frames_converted_ahead > 0)
        assert vi.source.stats.frames_converted_ahead > 0
        vi.plan(plan_a, plan_m)  # the same plan again: a no-op, the walk goes on
        first = vi.appearance(0)
    finally:
        vi.close()
    ref = open_video(a.long, cfg, 16, decode=DecodeOptions(read_ahead=0, skip_nonref=False))
    try:
        np.testing.assert_array_equal(first, ref.appearance(0))
    finally:
        ref.close()
    assert decode_threads() == []


def test_no_decode_thread_outlives_a_video_refused_before_its_first_step():
    from hms_deploy.runtime.session import Session

    a = assets()
    with Session(checkpoint=a.checkpoint) as s:
        # a forced policy starts the decode thread before the audio is decoded; the
        # silent video is then refused (--no-audio-policy error): its thread is stopped
        with pytest.raises(VideoError, match="no audio track"):
            s.classify(a.silent, policy="rates:1,1", no_audio_policy="error")
        assert decode_threads() == []
        rec = s.classify(a.long, policy="rates:1,1")  # the session still works
        assert rec["usage"]["appearance"] > 0
    assert decode_threads() == []


def test_frames_a_gate_may_skip_are_not_converted_ahead():
    from hms_deploy.runtime.policy import GATE

    a = assets()
    cfg = tiny_config(6)
    steps = 16
    app = np.full(steps, GATE, dtype=np.int64)  # the learned gate decides every step
    app[::4] = 1  # ... except these, which run the backbone whatever it says
    mot = np.zeros(steps, dtype=np.int64)
    reads = [0, 3, 4, 9, 12]

    def inputs(opts: DecodeOptions):
        vi = open_video(a.long, cfg, steps, decode=opts)
        try:
            vi.plan(app, mot)
            out = [vi.appearance(t) for t in reads]
            assert vi.source is not None
            return out, vi.source.stats
        finally:
            vi.close()

    ref, _ = inputs(DecodeOptions(read_ahead=0, skip_nonref=False))
    got, st = inputs(DecodeOptions())
    for x, y in zip(got, ref):
        np.testing.assert_array_equal(x, y)
    # only the frames of the steps that surely run (0, 4, 12 among the reads) were
    # converted and resized ahead; the gate's steps 3 and 9 were converted when read
    n_sure = int((app == 1).sum())  # 4 steps; their frames are distinct on this video
    assert 3 <= st.frames_converted_ahead <= n_sure
    assert 3 <= st.frames_derived_ahead <= n_sure
    assert st.frames_converted == 2  # steps 3 and 9, in the step loop
    assert decode_threads() == []

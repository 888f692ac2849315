"""Generate THE benchmark reference video (cached under ``benchmarks/media/``).

60 s, 640x360, 30 fps H.264 (a keyframe every 2 s) with speech-like mono AAC, made by
:func:`hms_deploy.data.synthetic.make_reference_video` (deterministic). The file is
git-ignored; every benchmark calls :func:`reference_video`, which makes it once.

    python -m benchmarks.make_reference_video [--out PATH] [--force]
    python -m benchmarks.make_reference_video --stereo-48k --out PATH

``--stereo-48k``: the reference with its audio made 48 kHz stereo AAC (the video stream
copied): what camera and phone videos carry, so the audio path resamples and downmixes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

MEDIA_DIR = Path(__file__).resolve().parent / "media"
REFERENCE = MEDIA_DIR / "reference_60s_640x360.mp4"
SMOKE = MEDIA_DIR / "smoke_6s_320x180.mp4"


def reference_video(
    path: str | Path = REFERENCE, *, force: bool = False, smoke: bool = False
) -> Path:
    """The reference video at ``path`` (made if missing). ``smoke``: a 6 s 320x180 cut-down
    with the same frame rate, keyframe interval and audio, for the seconds-long CI run."""
    from hms_deploy.data.synthetic import make_reference_video

    path = Path(path)
    if path.exists() and path.stat().st_size > 0 and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".partial" + path.suffix)
    if smoke:
        make_reference_video(tmp, duration_s=6.0, size=(320, 180))
    else:
        make_reference_video(tmp)
    tmp.replace(path)
    return path


def with_stereo_48k_audio(src: str | Path, dst: str | Path) -> Path:
    """``src`` with its video packets copied and its audio resampled to 48 kHz stereo and
    encoded as AAC (both channels the same signal)."""
    from fractions import Fraction

    import av

    dst = Path(dst)
    tmp = dst.with_name(dst.stem + ".partial" + dst.suffix)
    with av.open(str(src)) as inp, av.open(str(tmp), "w") as out:
        vin, ain = inp.streams.video[0], inp.streams.audio[0]
        vout = out.add_stream_from_template(vin)
        aout = out.add_stream("aac", rate=48000, layout="stereo")
        resampler = av.AudioResampler(format="fltp", layout="stereo", rate=48000)
        n = 0

        def encode(frames: list) -> None:
            nonlocal n
            for f in frames:
                f.pts, f.time_base = n, Fraction(1, 48000)
                n += f.samples
                out.mux(aout.encode(f))

        for packet in inp.demux(vin, ain):
            if packet.stream is vin:
                if packet.dts is not None:
                    packet.stream = vout
                    out.mux(packet)
                continue
            for frame in packet.decode():
                encode(resampler.resample(frame))
        encode(resampler.resample(None))
        out.mux(aout.encode(None))
    tmp.replace(dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REFERENCE,
                    help=f"output file (default {REFERENCE})")
    ap.add_argument("--smoke", action="store_true", help="the 6 s 320x180 smoke-test cut instead")
    ap.add_argument("--force", action="store_true", help="regenerate even if the file exists")
    ap.add_argument("--stereo-48k", action="store_true",
                    help="write the reference with 48 kHz stereo AAC audio to --out")
    args = ap.parse_args(argv)
    if args.stereo_48k:
        if args.out == REFERENCE:
            ap.error("--stereo-48k needs --out (the reference itself stays as it is)")
        path = with_stereo_48k_audio(reference_video(), args.out)
        print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB)")
        return 0
    out = args.out if args.out != REFERENCE or not args.smoke else SMOKE
    t0 = time.perf_counter()
    path = reference_video(out, force=args.force, smoke=args.smoke)
    print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

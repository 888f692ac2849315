"""Many videos on every core and every machine: ``hms-run --ray`` and ``hms-extract --ray``
on Ray Data.

The input list becomes a Ray dataset of paths, one row per video (one task each). A
pool of actors maps it; each actor owns one :class:`~hms_deploy.runtime.session.Session`
(classification) or one set of encoders (extraction), loaded once in ``__init__``, and
decodes the videos it classifies (the frames a gate asks for are known only there).
Results stream back to the driver as they finish, which writes them at once (a crash of
the driver loses only the videos in flight)::

    from hms_deploy.runtime.ray_batch import RayLayout, classify_ray

    for rec in classify_ray(["a.mp4", "b.mp4"], engines_dir="engines/",
                            layout=RayLayout(workers=2), output="results.jsonl"):
        print(rec["video"], rec.get("label"), rec.get("error"))

Records are exactly ``hms-run --json``'s (the actor runs ``Session.classify_many`` on
one video); a video that fails gives the same ``{"video", "error"}`` record and the job
goes on. An actor returns the record as typed Arrow columns and the driver rebuilds it
key for key (:mod:`~hms_deploy.runtime.ray_columns`). ``output`` is a
:class:`~hms_deploy.runtime.results.ResultsFile`: finished videos are skipped on a rerun,
failed ones retried.

Layout (:class:`~hms_deploy.runtime.ray_cluster.RayLayout`): by default one actor per
CPU with one intra-op thread each (2 cores: 2 actors x 1 thread), which
keeps every core busy with whole videos instead of splitting one video's small calls
across threads. On GPU machines give ``gpus_per_worker=1`` (``--device cuda``): one
actor per GPU. Without ``address`` a loopback-only local Ray instance is started for the
job (:mod:`hms_deploy.runtime.ray_cluster`); with it the job runs on that cluster, whose
nodes must see the export / checkpoint and the videos at the same paths.

Faults: if an actor process dies (OOM killer, SIGKILL, a lost node), Ray restarts it and
retries the video it held on a live actor; the driver yields each video once.
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hms_deploy.runtime.engines import DEFAULT_DEVICE
from hms_deploy.runtime.options import RunSettings
from hms_deploy.runtime.ray_cluster import (
    RayLayout,
    actor_setup,
    map_rows,
    pool_size,
    ray_instance,
)
from hms_deploy.runtime.ray_columns import record_column, record_from_column

__all__ = [
    "ClassifyActor", "ExtractActor", "RayLayout", "classify_ray", "ray_feature_source",
    "ray_records",
]


def _abs(path: str | Path | None) -> str | None:
    return None if path is None else os.path.abspath(path)


# ----------------------------------------------------------------------- classification


class ClassifyActor:
    """One Session per actor; ``__call__`` classifies one row ``{"index", "video", "abs"}``."""

    def __init__(self, session_kwargs: dict[str, Any], options: RunSettings, threads: int,
                 cwd: str):
        from hms_deploy.runtime.session import Session

        self.local_paths = actor_setup(threads, cwd)
        kwargs = dict(session_kwargs)
        if kwargs.get("engine") in (None, "onnx") and kwargs.get("checkpoint") is None:
            kwargs.setdefault("threads", threads)  # ONNX Runtime intra-op threads
        self.session = Session(**kwargs).open()
        self.options = options

    def __call__(self, batch: dict[str, NDArray[np.generic]]) -> Any:
        """The row's record as a typed Arrow column (:mod:`~hms_deploy.runtime.ray_columns`)
        beside the actor's process id, the video's wall-clock span and CPU seconds: a
        ``pyarrow.Table`` of one row (:func:`map_rows` hands each call one row)."""
        import pyarrow as pa

        (i,), (video,), (absolute,) = batch["index"], batch["video"], batch["abs"]
        name = str(video)
        target = name if self.local_paths else str(absolute)
        start, cpu = time.time(), time.process_time()
        rec = next(iter(self.session.classify_many([target], options=self.options)))
        cpu_s = time.process_time() - cpu
        rec["video"] = name
        return pa.table({"index": [int(i)], "pid": [os.getpid()], "start": [start],
                         "end": [time.time()], "cpu_s": [cpu_s], "record": record_column(rec)})


def classify_ray(
    videos: Sequence[str],
    *,
    engines_dir: str | Path | None = None,
    checkpoint: str | Path | None = None,
    engine: str | None = None,
    device: str = DEFAULT_DEVICE,
    options: RunSettings | None = None,
    layout: RayLayout | None = None,
    output: str | Path | Any | None = None,
    progress: bool = False,
    on_worker: Any = None,
    **settings: Any,
) -> Iterator[dict[str, Any]]:
    """Classify ``videos`` on a Ray Data actor pool; yield one record per video as it finishes.

    ``options`` / ``settings``: a :class:`~hms_deploy.runtime.options.RunSettings` and
    overrides of its fields, as for :meth:`Session.classify_many
    <hms_deploy.runtime.session.Session.classify_many>`, validated at the call, before Ray
    starts (:class:`ConfigError`; ``online`` and ``batch_size`` > 1 are refused: actors
    classify whole videos); the records come from the returned iterator.
    ``output``: a path or an open :class:`~hms_deploy.runtime.results.ResultsFile` (a path
    is opened with the run's settings, :func:`~hms_deploy.runtime.results.run_settings`,
    so ``hms-run --output`` resumes it and vice versa); videos already done there are
    skipped and every record is appended before it is yielded.
    ``progress``: a tqdm bar on stderr (videos done / failed / rate). ``on_worker``:
    called with ``(record, {"pid", "start", "end", "cpu_s"})`` before each yield: the
    actor's process id, the wall-clock span (``time.time()``) of that video in it and the
    actor's CPU seconds (all its threads) during it (tests, benchmarks; never part of the
    record).
    """
    from hms_deploy.runtime.results import ResultsFile, run_settings
    from hms_deploy.runtime.session import Session

    layout = layout or RayLayout()
    layout.check()
    session_kwargs: dict[str, Any] = {
        "engines_dir": engines_dir, "checkpoint": checkpoint, "engine": engine, "device": device}
    # the driver validates the export and the options (cheap: no engine is created)
    session = Session(**session_kwargs)
    options = session.options(options, **settings)
    options.require_whole_videos()
    results: Any = output
    if output is not None and not isinstance(output, ResultsFile):
        results = ResultsFile(output, settings=run_settings(session, options))
    todo = [str(v) for v in videos if results is None or not results.done(str(v))]
    stream = ray_records(session_kwargs, options, layout, progress=progress,
                         on_worker=on_worker)
    return _stream(stream, todo, results, close=results is not output)


def ray_records(session_kwargs: dict[str, Any], options: RunSettings, layout: RayLayout, *,
                progress: bool = False, on_worker: Any = None) -> Any:
    """``records(videos)``: the records of ``videos`` classified on a Ray Data actor pool,
    each actor a ``Session(**session_kwargs)`` run with ``options`` (a
    :class:`~hms_deploy.runtime.options.RunSettings`), in the order they finish. The record
    source of ``hms-run --ray`` (:class:`hms_deploy.cli.batch.JobOptions` ``records``):
    the job loop, its output file and its exit codes are the plain run's."""
    layout.check()
    options.require_whole_videos()
    kwargs = dict(session_kwargs)
    for k in ("engines_dir", "checkpoint"):
        kwargs[k] = _abs(kwargs.get(k))
    device = str(kwargs.get("device") or DEFAULT_DEVICE)
    if device.startswith("cuda"):
        # one actor per GPU; Ray makes the GPU it assigns the actor's only visible one
        layout = dataclasses.replace(layout, gpus_per_worker=layout.gpus_per_worker or 1.0)
        kwargs["device"] = "cuda"
    ctor = {"session_kwargs": kwargs, "options": options,
            "threads": layout.threads_per_worker, "cwd": os.getcwd()}

    def records(videos: Sequence[str]) -> Iterator[dict[str, Any]]:
        rows = [{"index": i, "video": str(v), "abs": os.path.abspath(v)}
                for i, v in enumerate(videos)]
        if rows:
            yield from _run(ClassifyActor, rows, layout, progress, ctor, on_worker)

    return records


def _stream(records: Any, todo: list[str], results: Any, *, close: bool
            ) -> Iterator[dict[str, Any]]:
    try:
        for rec in records(todo):
            if results is not None:
                results.append(rec)
            yield rec
    finally:
        if close and results is not None:
            results.close()


def _run(actor_cls: type, rows: list[dict[str, Any]], layout: RayLayout, progress: bool,
         ctor_kwargs: dict[str, Any], on_worker: Any) -> Iterator[dict[str, Any]]:
    bar = None
    with ray_instance(layout) as ray:
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(rows), unit="video", file=sys.stderr, dynamic_ncols=True,
                       desc=f"ray x{min(pool_size(ray, layout), len(rows))}")
        failed = 0
        try:
            for row in map_rows(ray, actor_cls, rows, layout, ctor_kwargs):
                rec = record_from_column(row["record"])
                if bar is not None:
                    failed += "error" in rec
                    bar.set_postfix(failed=failed, refresh=False)
                    bar.update(1)
                if on_worker is not None:
                    on_worker(rec, {"pid": int(row["pid"]), "start": float(row["start"]),
                                    "end": float(row["end"]), "cpu_s": float(row["cpu_s"])})
                yield rec
        finally:
            if bar is not None:
                bar.close()


# --------------------------------------------------------------------------- extraction


class ExtractActor:
    """The checkpoint's encoders per actor; ``__call__`` decodes and encodes one video with
    :func:`hms_deploy.data.extraction.decode_job` / ``encode_job`` (the single-process code)."""

    def __init__(self, checkpoint: str, steps: int, batch_size: int, threads: int, cwd: str):
        from hms_deploy.checkpoint import load_checkpoint
        from hms_deploy.data.extraction import build_encoders

        actor_setup(threads, cwd)
        ckpt = load_checkpoint(checkpoint)
        self.config = ckpt.config
        self.encoders = build_encoders(ckpt.config, ckpt.state_dict)
        self.steps = steps
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, NDArray[np.generic]]) -> Any:
        """A ``pyarrow.Table``, one row per video: its index, the error (None if it
        worked), duration and audio flag (None if it failed), features (``np.savez``
        bytes) and the actor's process id."""
        import pyarrow as pa

        from hms_deploy.data.extraction import decode_job, encode_job

        schema = pa.schema([("index", pa.int64()), ("error", pa.string()),
                            ("duration_s", pa.float64()), ("has_audio", pa.bool_()),
                            ("features", pa.binary()), ("pid", pa.int64())])
        out: dict[str, list[Any]] = {name: [] for name in schema.names}
        for i, key, path in zip(batch["index"], batch["key"], batch["path"]):
            inputs, error = decode_job(str(key), str(path), self.config, self.steps)
            video = None
            if error is None:
                video, error = encode_job(str(key), self.encoders, inputs, self.batch_size)
            buf = io.BytesIO()
            if video is not None:
                np.savez(buf, **video.feats)
            out["index"].append(int(i))
            out["error"].append(error if video is None else None)
            out["duration_s"].append(None if video is None else float(video.duration_s))
            out["has_audio"].append(None if video is None else bool(video.has_audio))
            out["features"].append(buf.getvalue())
            out["pid"].append(os.getpid())
        return pa.table(out, schema=schema)


def ray_feature_source(checkpoint: str | Path, layout: RayLayout | None = None, *,
                       batch_size: int | None = None) -> Any:
    """A ``source`` for :func:`hms_deploy.data.extraction.extract` that runs on Ray Data.

    Each actor loads ``checkpoint``'s encoders once, then decodes and encodes whole
    videos; the driver (``extract``) writes the store, its index and its error list
    exactly as in the single-process path. Features come back in the order videos
    finish (store slots follow that order; the features of a video are the same).
    ``batch_size``: steps per backbone call (None: extract's).
    """
    from hms_deploy.data.extraction import ENCODE_BATCH, VideoFeatures

    encode_batch = ENCODE_BATCH if batch_size is None else batch_size
    layout = layout or RayLayout()
    layout.check()
    ckpt_path = os.path.abspath(checkpoint)

    def source(entries: Sequence[Any], config: Any, steps: int) -> Iterator[Any]:
        rows = [{"index": i, "key": e.key, "path": os.path.abspath(e.path)}
                for i, e in enumerate(entries)]
        if not rows:
            return
        kwargs = {"checkpoint": ckpt_path, "steps": steps, "batch_size": encode_batch,
                  "threads": layout.threads_per_worker, "cwd": os.getcwd()}
        with ray_instance(layout) as ray:
            for row in map_rows(ray, ExtractActor, rows, layout, kwargs):
                e = entries[int(row["index"])]
                if row["duration_s"] is None:  # failed (``extract`` words a missing error)
                    yield e, None, row["error"]
                    continue
                with np.load(io.BytesIO(row["features"])) as z:
                    feats = {m: z[m] for m in z.files}
                yield e, VideoFeatures(row["duration_s"], row["has_audio"], feats), None

    return source


"""The Python inference API: open an export (or a checkpoint) once, classify many videos.

Every result is the same dict that ``hms-run --json`` prints (docs/record.md)::

    from hms_deploy.runtime import Session

    with Session(engines_dir="engines/") as session:          # ONNX Runtime, CPU
        rec = session.classify("a.mp4")                       # one video -> one record
        print(rec["label"], rec["score"], rec["usage"], rec["gflops"]["used"])

        for rec in session.classify_many(["a.mp4", "b.mp4"], budget=200.0):
            if "error" in rec:                                # a failed video does not stop the others
                print(rec["video"], rec["error"])

    with Session(checkpoint="ckpt.pt", engine="torch", device="cuda") as session:
        for rec in session.classify_many(["a.mp4"], online=True):
            ...  # partial records ("partial": True) after every step, then the final one

``Session(engines_dir=None, checkpoint=None, engine=None, device="cpu", **engine_options)``:
``engine`` is ``"onnx"`` (default), ``"trt"`` (both need ``engines_dir``, default
``engines/``) or ``"torch"`` (needs ``checkpoint``; the default when only a checkpoint
is given). ``engine_options`` go to the backend (e.g. ONNX Runtime ``providers``; for
``trt``, ``build_plans=add_trt_plans`` (from the export package) builds missing plans on first
use, as ``hms-run`` does; without it a missing plan is an error saying how to build it).
Opening verifies the export's hashes (each file read once per process while it is unchanged:
:func:`~hms_deploy.runtime.manifest.file_sha256`); the engines are created once, on ``__enter__``
(or on first use) and freed by ``close()`` / ``__exit__``.

``classify(video, options=None, **settings)``: ``options`` is a
:class:`~hms_deploy.runtime.options.RunSettings` (default: its defaults; its docstring
says what each field means) and ``settings`` override its fields by name (``steps``,
``policy``, ``budget``, ``online``, ...). With ``online``, ``classify`` returns only the
final record; ``classify_many`` yields the partial ones too: as each step finishes with
``batch_size=1``; with ``batch_size > 1`` only once the whole batch has finished, because
a failure reruns the batch video by video and partials already yielded could not be taken
back. An unknown name or a bad value raises :class:`~hms_deploy.errors.ConfigError` (its
``setting`` names the field); :class:`~hms_deploy.errors.VideoError` for a video that
cannot be read.

``classify_many(videos, options=None, **settings)`` validates the settings first (raising
at the call, not at the first ``next``), then yields one record per video, in order; a
video that fails with an :class:`~hms_deploy.errors.HMSError` (a bad input) yields
``{"video": ..., "error": "one line"}`` and the rest go on; any other exception is a bug
and propagates. ``batch_size > 1`` steps that many videos in lockstep, each skipping on
its own (records then carry the batch's timing and engine-call counts); if one video of a
batch fails, the others are rerun one by one.
A video whose file changed while it ran (its inode, size or mtime differ at the end from
the start: rewritten, or replaced by a ``mv``) gets an error record saying so instead of
a result mixed from two files.

Record fields (docs/record.md; additions, never changes):

- ``checkpoint``: sha256 of the checkpoint file (torch engine only; ``export`` is null
  there, as the record has no export).
- ``warnings`` (docs/record.md): a list of one-line remarks (a fallback used, a truncated
  file classified, steps that outnumber distinct frames or audio patches); ``fallback``:
  ``"no_audio"`` when the no-audio policy replaced the gates, else null.
- ``coverage``: ``{"audio_s", "duration_s", "share"}``: seconds of the video inside some
  step's audio window, the duration, and their ratio (docs/record.md).
- ``partial``: ``true`` on the running records of ``online`` mode (absent otherwise).
- ``stats``: ``host_reads`` (gate decisions read from the device: one per gate
  evaluated), ``prediction_reads`` (head outputs read: 1, or one per step online),
  ``batch`` (videos in lockstep), ``vetoed`` ({modality: gate fires refused by the
  budget}), ``appearance_frames`` / ``motion_clips`` (inputs handed to each backbone),
  ``frames_decoded`` / ``frames_converted`` (RGB) / ``seeks`` / ``window_hits`` (the
  decoder's counters), ``engine_calls`` ({part: calls made by this run so far:
  cumulative, and the audio path runs ahead of the gated loop, so without a budget a
  partial record at step 1 already counts all T ``audio_cell`` calls}), ``audio_steps``
  (steps whose audio path has run so far: T without a budget, from the first record on),
  ``appearance_batches`` (appearance backbone calls that computed this video's frames of
  several steps ahead, :mod:`hms_deploy.runtime.appearance_ahead`; 0 when its frames ran
  step by step).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from typing_extensions import Self

from hms_deploy.errors import ConfigError, HMSError, first_line
from hms_deploy.outputs import file_stamp
from hms_deploy.runtime.engines import DEFAULT_DEVICE, EngineSet, open_engine_set
from hms_deploy.runtime.manifest import file_sha256
from hms_deploy.runtime.options import RunSettings, resolve_options
from hms_deploy.runtime.scheduler import engine_stream, run_batch


class Session:
    """An opened model (EngineSet) that classifies videos; see the module docstring."""

    def __init__(
        self,
        engines_dir: str | Path | None = None,
        checkpoint: str | Path | None = None,
        engine: str | None = None,
        device: str = DEFAULT_DEVICE,
        **engine_options: object,
    ):
        if engine is None:
            engine = "torch" if checkpoint is not None and engines_dir is None else "onnx"
        if checkpoint is not None and engines_dir is not None:
            raise ConfigError("give an export dir or a checkpoint, not both",
                              setting=("engines_dir", "checkpoint"))
        if engine != "torch" and checkpoint is None:
            d = Path(engines_dir if engines_dir is not None else "engines")
            if d.is_file():
                raise ConfigError(
                    f"engines_dir expects an export directory, but '{d}' is a file; run a "
                    "checkpoint with the torch engine, or export it first (hms-export)",
                    setting="engines_dir", value=d, expected="an export directory")
            if not d.is_dir():
                raise ConfigError(
                    f"engines directory '{d}' not found; export a checkpoint first "
                    "(hms-export), or run the checkpoint with the torch engine",
                    setting="engines_dir", value=d, expected="an export directory")
            engines_dir = d
        self.engine_set: EngineSet = open_engine_set(
            engine, engines_dir=engines_dir, checkpoint=checkpoint, device=device, **engine_options
        )
        self.checkpoint_sha256 = (file_sha256(checkpoint) if engine == "torch" and checkpoint
                                  else None)
        self._open = False
        self._stream: object = None

    # -- lifetime ------------------------------------------------------------------------
    def open(self) -> Self:
        if not self._open:
            self.engine_set.__enter__()
            self._stream = engine_stream(self.engine_set)  # CUDA: the one stream of every run
            self._open = True
        return self

    def close(self) -> None:
        if self._open:
            self.engine_set.__exit__(None, None, None)
            self._open = False

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- facts ---------------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        return self.engine_set.labels

    @property
    def steps(self) -> int:
        """The model's default T."""
        return self.engine_set.config.steps

    def options(self, options: RunSettings | None = None, **overrides: Any) -> RunSettings:
        """``options`` (default: the defaults) with ``overrides`` (:class:`RunSettings` field
        names), checked against the model (:class:`ConfigError` if bad), for reuse."""
        return resolve_options(self.engine_set, options, **overrides)

    # -- classify ------------------------------------------------------------------------
    def _finish(self, rec: dict[str, Any]) -> dict[str, Any]:
        if self.checkpoint_sha256 is not None:
            rec["checkpoint"] = self.checkpoint_sha256
        return rec

    def classify(self, video: str | Path, options: RunSettings | None = None,
                 **overrides: Any) -> dict[str, Any]:
        """Classify one video; the final record (errors raise). Settings as :meth:`options`."""
        opts = self.options(options, **overrides)
        self.open()
        final: list[dict[str, Any]] = []
        for recs in run_batch(self.engine_set, [str(video)], opts, stream=self._stream):
            final = recs
        return self._finish(final[0])

    def classify_many(self, videos: Iterable[str | Path], options: RunSettings | None = None,
                      **overrides: Any) -> Iterator[dict[str, Any]]:
        """Yield one record per video (error records included); see the module docstring.
        Settings as :meth:`options` (``batch_size`` among them)."""
        opts = self.options(options, **overrides)
        self.open()
        return self._many(videos, opts, opts.batch_size)

    def _many(self, videos: Iterable[str | Path], opts: RunSettings, batch_size: int) -> Iterator[dict[str, Any]]:
        batch: list[str] = []
        for v in videos:
            batch.append(str(v))
            if len(batch) == batch_size:
                yield from self._run(batch, opts)
                batch = []
        if batch:
            yield from self._run(batch, opts)

    def _run(self, batch: list[str], opts: RunSettings) -> Iterator[dict[str, Any]]:
        start = [file_stamp(v) for v in batch]  # the files as the run starts
        if len(batch) > 1:
            held: list[dict[str, Any]] = []  # partials of a batch are released only if it succeeds
            try:
                for recs in run_batch(self.engine_set, batch, opts, stream=self._stream):
                    held.extend(self._finish(r) for r in recs)
            except HMSError:  # a bad input: rerun the batch's videos one by one
                for v in batch:
                    yield from self._run([v], opts)
                return
            changed = {v: why for v, s in zip(batch, start) if (why := _changed(v, s))}
            for r in held:
                why = changed.get(r["video"])
                if why is None:
                    yield r
                elif not r.get("partial"):
                    yield {"video": r["video"], "error": why}
            return
        try:
            for recs in run_batch(self.engine_set, batch, opts, stream=self._stream):
                for r in recs:
                    why = None if r.get("partial") else _changed(batch[0], start[0])
                    yield self._finish(r) if why is None else {"video": r["video"], "error": why}
        except HMSError as e:  # a bad input; anything else is a bug and propagates
            yield {"video": batch[0], "error": first_line(e)}


def _changed(video: str, start: dict[str, int] | None) -> str | None:
    """Why ``video``'s file is not the one its run started on (None if it is the same)."""
    if start is None:
        return None  # unreadable at the start: its run failed with its own error
    now = file_stamp(video)
    if now == start:
        return None
    what = ("was removed" if now is None else
            "was replaced (another inode)" if (now["dev"], now["ino"]) != (start["dev"], start["ino"])
            else f"was rewritten (size {start['size']} -> {now['size']} bytes, mtime changed)"
            if now["size"] != start["size"] else "was modified (mtime changed)")
    return (f"{video}: the file {what} while it was classified; no result from a mix of two "
            "files: run it again")

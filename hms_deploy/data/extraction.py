"""Feature extraction (``hms-extract``): videos -> raw per-step backbone features in a
:class:`~hms_deploy.data.features.FeatureStore` (the store format lives there).

Extraction (:func:`extract`, behind ``hms-extract``): decoding processes turn each video
into the inputs of all T steps (:func:`prepare_video`: log-mel patches, appearance
frames, the distinct frames of the motion clips); the main process runs the three
encoders of the checkpoint on them, ``batch_size`` steps per call, and appends the raw
features. Memory: a video in flight holds its distinct motion frames, e.g. up to
~150 kB each at 224 px (a 2-minute 30 fps video at T = 128: <= 3600 frames, ~0.5 GB), and
up to ``2 * workers`` videos are in flight.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from hms_deploy.config import MODALITIES, HMSConfig
from hms_deploy.data.features import FeatureStore
from hms_deploy.data.inputs import VideoInputs
from hms_deploy.data.store_meta import (
    DEFAULT_DTYPE,
    DEFAULT_SHARD_SIZE,
    DTYPES,
    StoreMeta,
    backbone_hash,
)
from hms_deploy.errors import ConfigError, DatasetError, Note, first_line, require_at_least
from hms_deploy.outputs import file_identity
from hms_deploy.version import __version__

ENCODE_BATCH = 16  # steps per backbone call


@dataclass
class VideoFeatures:
    """One video's raw features ``feats`` {modality: (T, D) float32}, ready for the store."""

    duration_s: float
    has_audio: bool
    feats: dict[str, NDArray[np.float32]]


def prepare_video(path: str | os.PathLike[str], config: HMSConfig, steps: int) -> VideoInputs:
    """Decode one video into the inputs of all ``steps`` steps (docs/method.md §1):
    :meth:`VideoInputs.decode_all`. Raises :class:`~hms_deploy.errors.VideoError` for a
    file that cannot be decoded, is not a video or is truncated (:mod:`hms_deploy.data.checks`)."""
    from hms_deploy.data.checks import check_truncation, require_video
    from hms_deploy.data.video import probe_open

    probed = probe_open(Path(path))  # its container is then read for the frames
    try:
        require_video(probed.info)  # docs/method.md §9: no features of an image or of a truncated file
        check_truncation(probed.info)
    except BaseException:
        probed.close()
        raise
    return VideoInputs(Path(path), config, steps, info=probed).decode_all()


def build_encoders(config: HMSConfig, state_dict: dict[str, Any]) -> dict[str, Any]:
    """The three encoders of a checkpoint (any policy), eval mode: {modality: nn.Module}."""
    from hms_deploy.model.hms import HMS

    model = HMS(config)
    enc = {k: v for k, v in state_dict.items() if ".encoder." in k}
    missing = [k for k in model.state_dict() if ".encoder." in k and k not in enc]
    if missing:
        raise DatasetError(f"checkpoint lacks backbone weights (e.g. {missing[:2]})")
    model.load_state_dict(enc, strict=False)
    return {m: getattr(model, f"{m}_backbone").encoder.eval() for m in MODALITIES}


def encode_video(
    encoders: dict[str, Any], inputs: VideoInputs, batch_size: int = ENCODE_BATCH
) -> dict[str, NDArray[np.float32]]:
    """Raw features of one video: ``{modality: (T, D) float32}``, in chunks of ``batch_size`` steps.

    Chunks depend only on T and ``batch_size``, so a video's features do not depend on
    which other videos are extracted with it.
    """
    import torch

    assert inputs.mel is not None and inputs.frames is not None  # decoded (decode_all)
    steps = inputs.mel.shape[0]
    out: dict[str, list[NDArray[np.float32]]] = {m: [] for m in MODALITIES}
    with torch.inference_mode():
        for a in range(0, steps, batch_size):
            s = slice(a, min(a + batch_size, steps))
            out["audio"].append(encoders["audio"](torch.from_numpy(inputs.mel[s])).numpy())
            out["appearance"].append(
                encoders["appearance"](torch.from_numpy(inputs.frames[s])).numpy())
            out["motion"].append(encoders["motion"](torch.from_numpy(inputs.clips(s))).numpy())
    return {m: np.concatenate(v).astype(np.float32, copy=False) for m, v in out.items()}


# -- worker side ----------------------------------------------------------------------

_WORKER_CONFIG: dict[str, HMSConfig] = {}


def _worker_init() -> None:
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")


def _prepare_job(key: str, path: str, config_json: str, steps: int) -> tuple[str, Any, str | None]:
    """Worker entry: (key, VideoInputs or None, error or None); never raises."""
    from hms_deploy.errors import HMSError

    try:
        cfg = _WORKER_CONFIG.get(config_json)
        if cfg is None:
            cfg = _WORKER_CONFIG[config_json] = HMSConfig.from_dict(json.loads(config_json))
        return key, prepare_video(path, cfg, steps), None
    except HMSError as e:
        return key, None, first_line(e, typed=False)
    except MemoryError:
        return key, None, f"{path}: out of memory while decoding"
    except Exception as e:  # noqa: BLE001 - a bad video must not stop the run
        return key, None, f"{path}: {first_line(e, typed=True)}"


def decode_job(key: str, path: str, config: HMSConfig, steps: int) -> tuple[Any, str | None]:
    """Decode one video in this process: ``(VideoInputs, None)`` or ``(None, one-line error)``."""
    _, inputs, error = _prepare_job(key, path, json.dumps(config.to_dict()), steps)
    return inputs, error


def encode_job(
    key: str, encoders: dict[str, Any], inputs: VideoInputs, batch_size: int
) -> tuple[VideoFeatures | None, str | None]:
    """Run the encoders on one decoded video: ``(VideoFeatures, None)`` or ``(None, error)``."""
    try:
        feats = encode_video(encoders, inputs, batch_size)
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        return None, f"{key}: backbone failed ({first_line(e, typed=True)})"
    return VideoFeatures(inputs.duration_s, bool(inputs.has_audio), feats), None


# -- main side ------------------------------------------------------------------------


def iter_inputs(
    entries: Sequence[Any], config: HMSConfig, steps: int, workers: int = 1
) -> Iterator[tuple[Any, VideoInputs | None, str | None]]:
    """Decode ``entries`` (objects with ``key`` and ``path``) in ``workers`` processes.

    Yields ``(entry, inputs, None)`` or ``(entry, None, one-line error)`` in the order of
    ``entries`` (at most ``2 * workers`` videos in flight). ``workers=0`` decodes here.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    config_json = json.dumps(config.to_dict())
    if workers == 0:
        for e in entries:
            _, inputs, error = _prepare_job(e.key, str(e.path), config_json, steps)
            yield e, inputs, error
        return
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        window: list[tuple[Any, cf.Future[tuple[str, VideoInputs | None, str | None]]]] = []
        it = iter(entries)
        try:
            while True:
                while len(window) < 2 * workers:
                    e = next(it, None)
                    if e is None:
                        break
                    window.append(
                        (e, pool.submit(_prepare_job, e.key, str(e.path), config_json, steps)))
                if not window:
                    break
                e, fut = window.pop(0)  # in list order: a reproducible store
                try:
                    _, inputs, error = fut.result()
                except cf.process.BrokenProcessPool:
                    raise DatasetError(
                        "a decoding worker died (out of memory?); rerun to resume, with fewer "
                        "workers", setting="workers") from None
                yield e, inputs, error
        finally:
            for _, f in window:
                f.cancel()


def local_features(
    entries: Sequence[Any], config: HMSConfig, steps: int, *, workers: int,
    encoders: dict[str, Any], batch_size: int,
) -> Iterator[tuple[Any, VideoFeatures | None, str | None]]:
    """The single-machine source of :func:`extract`: decode in ``workers`` processes
    (:func:`iter_inputs`), encode here. Yields ``(entry, features or None, error)``."""
    for e, inputs, error in iter_inputs(entries, config, steps, workers):
        feats = None
        if error is None and inputs is not None:
            feats, error = encode_job(e.key, encoders, inputs, batch_size)
        yield e, feats, error


FeatureProducer = Callable[
    [Sequence[Any], HMSConfig, int], Iterable[tuple[Any, VideoFeatures | None, str | None]]
]
"""``source(entries, config, steps)``: see :func:`extract`."""


@dataclass
class ExtractReport:
    """Outcome of :func:`extract`: counts, failures (key, one-line error) and timing."""

    store: Path
    total: int
    extracted: int
    skipped: int
    failed: list[tuple[str, str]]
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def videos_per_min(self) -> float:
        return 60.0 * self.extracted / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        s = (f"{self.extracted} extracted, {self.skipped} already in the store, "
             f"{len(self.failed)} failed, of {self.total} rows; {self.seconds:.1f} s "
             f"({self.videos_per_min:.1f} videos/min)")
        return s


def check_extract_settings(*, steps: int | None = None, workers: int | None = None,
                           dtype: str | None = None, batch_size: int | None = None,
                           shard_size: int | None = None) -> None:
    """The settings of :func:`extract` (one left at None is not checked)."""
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}, expected one of {DTYPES}", setting="dtype",
                          value=dtype, expected=" or ".join(DTYPES))
    for name, value, low in (("steps", steps, 1), ("workers", workers, 0),
                             ("batch_size", batch_size, 1), ("shard_size", shard_size, 1)):
        require_at_least(name, value, low)


def extract(
    ckpt: Any,
    dataset: Any,
    out: str | os.PathLike[str],
    *,
    steps: int | None = None,
    workers: int = 1,
    dtype: str = DEFAULT_DTYPE,
    batch_size: int = ENCODE_BATCH,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: bool = True,
    source: FeatureProducer | None = None,
    lock: Any = None,
) -> ExtractReport:
    """Extract raw features of every video of ``dataset`` into the store ``out``.

    Args:
        ckpt: a :class:`~hms_deploy.checkpoint.Checkpoint` (its encoders and labels).
        dataset: a :class:`~hms_deploy.data.datasets.DatasetList`.
        steps: T (default: the checkpoint's).
        workers: decoding processes (decode + log-mel + resize/crop run there; the
            backbones run in this process). 0 decodes in this process.
        dtype: ``float16`` (default, half the disk) or ``float32``.
        batch_size: steps per backbone call.
        source: what computes the features of the videos to extract: ``source(entries,
            config, steps)`` yields ``(entry, VideoFeatures or None, one-line error or
            None)`` per entry, in any order (default :func:`local_features`; the Ray
            Data source is :func:`hms_deploy.runtime.ray_batch.ray_feature_source`).
        lock: the store's lock, taken earlier with
            :func:`~hms_deploy.data.features.lock_store` (None: taken here).

    Videos already in the store are skipped; per-video failures (row problems, unknown
    labels, missing or undecodable files) are recorded in ``errors.jsonl`` and returned,
    and the other videos still run.
    """
    check_extract_settings(steps=steps, workers=workers, dtype=dtype, batch_size=batch_size,
                           shard_size=shard_size)
    cfg = ckpt.config
    steps = int(steps or cfg.steps)
    meta = StoreMeta(
        steps=steps, dtype=dtype, dims={m: cfg.backbone(m).feat_dim for m in MODALITIES},
        labels=list(ckpt.labels), backbone_hash=backbone_hash(cfg, ckpt.state_dict),
        variant=cfg.variant, shard_size=shard_size,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), producer=f"hms_deploy {__version__}",
    )
    t0 = time.perf_counter()
    label_index = {name: i for i, name in enumerate(ckpt.labels)}
    store = FeatureStore.open_for_writing(out, meta, lock=lock)
    failed: list[tuple[str, str]] = []
    warnings: list[str] = []
    skipped = extracted = 0
    try:
        for prob in dataset.problems:
            failed.append((prob.key, prob.error))
            store.record_error(prob.key, "", prob.error)
        todo = []
        identity = {}
        for e in dataset.entries:
            identity[e.key] = file_identity(e.path)  # taken before the file is read
            if e.key in store and store.records[store._by_key[e.key]].matches(identity[e.key]):
                skipped += 1
            elif e.label not in label_index:
                err = (f"{e.key}: line {e.line}: unknown label {e.label!r} "
                       f"(not one of the checkpoint's {len(label_index)} labels)")
                failed.append((e.key, err))
                store.record_error(e.key, str(e.path), err)
            else:
                todo.append(e)
        total = len(dataset.entries) + len(dataset.problems)
        if source is None:
            encoders = build_encoders(cfg, ckpt.state_dict)

            def local(entries: Sequence[Any], config: HMSConfig, steps: int) -> Iterator[Any]:
                return local_features(entries, config, steps, workers=workers,
                                      encoders=encoders, batch_size=batch_size)
            source = local
        bar = _progress(total, skipped + len(failed), progress)

        def finish(entry: Any, video: VideoFeatures | None, error: str | None) -> None:
            nonlocal extracted
            if error is not None or video is None:
                error = error or f"{entry.key}: no features"
                failed.append((entry.key, error))
                store.record_error(entry.key, str(entry.path), error)
            else:
                if extracted == 0 and dtype == "float16":
                    warnings.extend(_float16_warnings(video.feats))
                shard, slot = store.write_features(video.feats)
                store.commit(
                    key=entry.key, path=str(entry.path), label=entry.label,
                    label_index=label_index[entry.label], duration_s=video.duration_s,
                    has_audio=video.has_audio, shard=shard, slot=slot,
                    identity=identity[entry.key],
                )
                extracted += 1
            bar.update(1)
            bar.set_postfix(failed=len(failed), refresh=False)

        for e, video, error in source(todo, cfg, steps):
            finish(e, video, error)
        bar.close()
    finally:
        store.close()
    return ExtractReport(Path(out), total, extracted, skipped, failed, time.perf_counter() - t0,
                         warnings)


def _float16_warnings(feats: dict[str, NDArray[np.float32]]) -> list[Note]:
    """Modalities whose typical |feature| is below float16's smallest normal number
    (6.1e-5), where float16 storage keeps only a few significant bits (e.g. random-init
    EfficientNet-B3 features, ~1e-5)."""
    out = []
    for m, a in feats.items():
        typical = float(np.median(np.abs(a)))
        if 0.0 < typical < float(np.finfo(np.float16).tiny):
            out.append(Note(f"{m} features are ~{typical:.1e}, below float16's normal range: "
                            "stored with few significant bits; use dtype float32",
                            settings=("dtype",)))
    return out


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="video", desc="extract", disable=not enabled,
                dynamic_ncols=True)

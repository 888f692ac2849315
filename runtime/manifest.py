"""``DIR/manifest.json``: what an export directory holds, and how to load it safely.

An export directory (``hms-export --out DIR``) holds one ONNX file per part (plus one
``<part>.onnx.data`` for parts over ~1.5 GB), optionally one TensorRT plan per part, a
TensorRT timing cache, and ``manifest.json``. Only files inside DIR are legal: absolute
paths and paths with ``..`` are refused on load, and so are symlinks that leave DIR.

Library API (the runtime consumes exactly this; keep it stable)::

    m = load_manifest(DIR)              # verify=True: every listed file's sha256 is checked
    m.config                            # HMSConfig (the model config of the checkpoint)
    m.labels, m.steps                   # class names (index = class id), default T
    m.precision                         # "fp32" | "fp16" (of the ONNX files)
    m.parts["motion_gate"].inputs       # [TensorSpec(name, per-sample shape, dtype), ...]
    m.parts["head"].gmac                # GMAC per sample
    m.path("audio_backbone", "onnx")    # absolute Path; kinds: "onnx", "onnx_data", "trt"
    m.has("trt")                        # every part has a plan
    m.sha256                            # sha256 of the manifest.json bytes (hms-run's "export")
    m.data["preprocessing"]             # the raw JSON dict for everything else

Errors: :class:`~hms_deploy.errors.ManifestError` naming the file (a missing or
malformed manifest, a listed file that is missing or whose sha256 differs, a path that
leaves DIR, a format newer than this code, parts that do not match the model config).

JSON layout, ``format_version`` 1 (keys in this order; ``...`` = abbreviated)::

    {
      "format": "hms-deploy-export", "format_version": 1,
      "created": "2025-01-01T12:00:00Z",
      "precision": "fp32",                      # of the ONNX files; I/O are always fp32/uint8/int64
      "T": 16,                                  # default steps
      "labels": ["piano", ...],
      "cost_unit": "GMAC",
      "config": {...},                          # HMSConfig.to_dict()
      "preprocessing": {"steps": 16, "audio": {...front end...},
                        "appearance": {"resize": 72, "crop": 64, "mean": [...], "std": [...], ...},
                        "motion": {..., "clip": {"frames": 32, "stride_s": 0.0667, "slow_frames": 8}}},
      "checkpoint": {"file": "ckpt.pt", "sha256": "...", "policy": "hms"},
      "producer": {"hms_deploy": "0.1.0", "torch": "...", "onnx": "...", "onnxruntime": "...",
                   "opset": 17, "exporter": "torch.onnx legacy (dynamo=False)", "python": "3.11.2",
                   "tensorrt": "10.13.0", "gpu": "NVIDIA H100", "compute_capability": "9.0"},
      "parts": {
        "audio_backbone": {
          "files": {"onnx": "audio_backbone.onnx", "trt": "audio_backbone.plan"},
          "sha256": {"onnx": "<hex>", "trt": "<hex>"},
          "inputs": [{"name": "mel", "shape": ["N", 1, 96, 64], "dtype": "float32"}],
          "outputs": [{"name": "feat", "shape": ["N", 32], "dtype": "float32"}],
          "gmac": 0.00039, "opset": 17, "precision": "fp32", "exporter": "...",
          "trt": {...plan metadata, see hms_deploy.runtime.trt_plan.plan_metadata...}   # only with plans
        }, ...all nine parts...
      },
      "tensorrt": null | {"version": ..., "gpu": ..., "compute_capability": "9.0", "max_batch": 8,
                          "opt_batch": 4, "timing_cache": "trt_timing.cache", ...},
      "parity": {...}                           # the export parity report (export/parity.py)
    }
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from hms_deploy.config import HMSConfig
from hms_deploy.dtypes import TORCH_DTYPES
from hms_deploy.errors import ConfigError, ManifestError
from hms_deploy.parts import PART_NAMES, PartSpec, TensorSpec, part_specs

FORMAT = "hms-deploy-export"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FILE_KINDS = ("onnx", "onnx_data", "trt")
_DTYPES = tuple(TORCH_DTYPES)


@dataclass(frozen=True)
class PartEntry:
    """One part of an export.

    ``files``/``sha256``: kind (``"onnx"``, ``"onnx_data"``, ``"trt"``) -> path relative to
    the export dir / hex digest. ``inputs``/``outputs``: :class:`TensorSpec` with the
    per-sample shape (the batch axis N is implicit, ``"N"`` in the JSON). ``gmac``: cost
    per sample. ``trt``: the plan's metadata (TensorRT version, GPU, profile, flags, the
    ONNX sha256 it was built from) or None.
    """

    name: str
    files: dict[str, str]
    sha256: dict[str, str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    gmac: float
    precision: str = "fp32"
    opset: int | None = None
    trt: dict[str, Any] | None = None

    @property
    def spec(self) -> PartSpec:
        return PartSpec(self.name, tuple(self.inputs), tuple(self.outputs))


@dataclass
class Manifest:
    """A loaded export directory (see the module docstring)."""

    dir: Path
    data: dict[str, Any]
    config: HMSConfig
    labels: list[str]
    steps: int
    parts: dict[str, PartEntry]
    _sha256: str = field(default="", repr=False)

    @property
    def sha256(self) -> str:
        """sha256 of the manifest.json bytes: identifies this export (``hms-run``'s "export")."""
        return self._sha256

    @property
    def precision(self) -> str:
        return str(self.data.get("precision", "fp32"))

    @property
    def producer(self) -> dict[str, Any]:
        return dict(self.data.get("producer", {}))

    @property
    def parity(self) -> dict[str, Any]:
        return dict(self.data.get("parity") or {})

    @property
    def tensorrt(self) -> dict[str, Any] | None:
        return self.data.get("tensorrt")

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST_NAME

    def has(self, kind: str) -> bool:
        """Whether every part has a file of ``kind`` (e.g. ``"trt"``)."""
        return all(kind in p.files for p in self.parts.values())

    def path(self, part: str, kind: str = "onnx") -> Path:
        """Absolute path of ``part``'s file of ``kind``; ManifestError if there is none."""
        if part not in self.parts:
            raise ManifestError(f"{self.manifest_path}: no part {part!r}, expected one of {PART_NAMES}")
        files = self.parts[part].files
        if kind not in files:
            raise ManifestError(
                f"{self.manifest_path}: part {part!r} has no {kind!r} file (has {sorted(files)})"
            )
        return (self.dir / files[kind]).absolute()


# ------------------------------------------------------------------------------ hashing


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# (device, inode, size, mtime_ns) of a file -> its sha256, for this process
_HASHED: dict[tuple[int, int, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """:func:`sha256_file`, read once per process per file: a file whose identity (device,
    inode, size, modification time in ns) is unchanged since it was hashed is not read
    again, so the Sessions of one export in one process (a driver's validating Session and
    its run, benchmarks opening several) hash it once; a rewritten file is hashed anew."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        if len(_HASHED) > 4096:  # bounded: a long-lived process that opens many exports
            _HASHED.clear()
        _HASHED[key] = sha256_file(path)
    return _HASHED[key]


# ------------------------------------------------------------------------ path checking


def check_relative_path(rel: Any, root: Path, *, what: str) -> Path:
    """The file ``root/rel`` if ``rel`` is a plain relative path that stays inside ``root``.

    Refuses absolute paths (POSIX or Windows), ``..`` components, empty names, and
    symlinks whose target leaves ``root``. Raises :class:`ManifestError` naming ``what``.
    """
    if not isinstance(rel, str) or not rel or rel.strip() != rel or "\x00" in rel:
        raise ManifestError(f"{what}: file path {rel!r} is not a plain relative path")
    posix, win = PurePosixPath(rel), PureWindowsPath(rel)
    if posix.is_absolute() or win.is_absolute() or win.drive or rel.startswith(("/", "\\")):
        raise ManifestError(f"{what}: file path {rel!r} is absolute; only files inside the export dir are legal")
    if ".." in posix.parts or ".." in win.parts:
        raise ManifestError(f"{what}: file path {rel!r} leaves the export dir ('..')")
    path = root / rel
    try:
        resolved = path.resolve()
        inside = resolved.is_relative_to(root.resolve())
    except (OSError, RuntimeError) as e:
        raise ManifestError(f"{what}: cannot resolve file path {rel!r} ({e})") from None
    if not inside:
        raise ManifestError(f"{what}: file path {rel!r} resolves outside the export dir (symlink?)")
    return path


# ------------------------------------------------------------------------------ loading


def _tensor_list(raw: Any, where: str) -> list[TensorSpec]:
    if not isinstance(raw, list):
        raise ManifestError(f"{where}: expected a list of tensors, got {type(raw).__name__}")
    out = []
    for t in raw:
        try:
            name, shape, dtype = t["name"], t["shape"], t["dtype"]
        except (TypeError, KeyError):
            raise ManifestError(f"{where}: tensor entry {t!r} needs name, shape and dtype") from None
        if not isinstance(shape, list) or not shape or shape[0] != "N":
            raise ManifestError(f"{where}: tensor {name!r} has shape {shape!r}, expected ['N', ...]")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape[1:]):
            raise ManifestError(f"{where}: tensor {name!r} has shape {shape!r}; dims after N must be positive ints")
        if dtype not in _DTYPES:
            raise ManifestError(f"{where}: tensor {name!r} has dtype {dtype!r}, expected one of {_DTYPES}")
        out.append(TensorSpec(str(name), tuple(shape[1:]), dtype))
    return out


def _part_entry(name: str, raw: Any, spec: PartSpec, root: Path, where: str) -> PartEntry:
    w = f"{where}: part {name!r}"
    if not isinstance(raw, dict):
        raise ManifestError(f"{w}: expected an object")
    files, hashes = raw.get("files"), raw.get("sha256")
    if not isinstance(files, dict) or "onnx" not in files:
        raise ManifestError(f"{w}: 'files' must map kinds to paths and include 'onnx'")
    if not isinstance(hashes, dict):
        raise ManifestError(f"{w}: 'sha256' must map each file kind to its digest")
    for kind, rel in files.items():
        if kind not in FILE_KINDS:
            raise ManifestError(f"{w}: unknown file kind {kind!r}, expected one of {FILE_KINDS}")
        check_relative_path(rel, root, what=f"{w} ({kind})")
        digest = hashes.get(kind)
        if not isinstance(digest, str) or len(digest) != 64:
            raise ManifestError(f"{w}: no sha256 for its {kind!r} file {rel!r}")
    inputs = _tensor_list(raw.get("inputs"), f"{w} inputs")
    outputs = _tensor_list(raw.get("outputs"), f"{w} outputs")
    if tuple(inputs) != spec.inputs or tuple(outputs) != spec.outputs:
        got = ", ".join(f"{t.name} {t.describe()}" for t in inputs + outputs)
        want = ", ".join(f"{t.name} {t.describe()}" for t in spec.inputs + spec.outputs)
        raise ManifestError(f"{w}: I/O [{got}] do not match the model config [{want}]")
    try:
        gmac = float(raw["gmac"])
    except (KeyError, TypeError, ValueError):
        raise ManifestError(f"{w}: 'gmac' (cost per sample) missing or not a number") from None
    trt = raw.get("trt")
    if trt is not None and not isinstance(trt, dict):
        raise ManifestError(f"{w}: 'trt' must be an object or null")
    opset = raw.get("opset")
    return PartEntry(
        name=name, files={str(k): str(v) for k, v in files.items()},
        sha256={str(k): str(v) for k, v in hashes.items() if k in files},
        inputs=inputs, outputs=outputs, gmac=gmac, precision=str(raw.get("precision", "fp32")),
        opset=int(opset) if isinstance(opset, int) else None, trt=trt,
    )


def verify_files(manifest: Manifest) -> list[str]:
    """Check every listed file exists and matches its sha256; returns one line per problem."""
    problems = []
    for entry in manifest.parts.values():
        for kind, rel in entry.files.items():
            path = manifest.dir / rel
            if not path.is_file():
                problems.append(f"{path}: missing (listed in {manifest.manifest_path} for {entry.name})")
                continue
            got = file_sha256(path)
            want = entry.sha256.get(kind, "")
            if got != want:
                problems.append(
                    f"{path}: sha256 mismatch (manifest {want[:12]}..., file {got[:12]}...); "
                    "the file was modified or the export is incomplete: re-export"
                )
    return problems


def load_manifest(dir: str | os.PathLike[str], verify: bool = True) -> Manifest:
    """Load ``dir/manifest.json``; with ``verify`` check every file's sha256 (see module doc)."""
    root = Path(dir)
    mpath = root / MANIFEST_NAME
    if not root.is_dir():
        raise ManifestError(f"{root}: export directory not found")
    if not mpath.is_file():
        raise ManifestError(f"{mpath}: not found ({root} is not an hms-export directory)")
    raw_bytes = mpath.read_bytes()
    try:
        data = json.loads(raw_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{mpath}: not an hms-deploy export manifest (no '{FORMAT}' format)")
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ManifestError(f"{mpath}: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{mpath}: format_version {version} is newer than this hms-deploy reads "
            f"({FORMAT_VERSION}); upgrade hms-deploy"
        )
    try:
        config = HMSConfig.from_dict(data["config"])
    except KeyError:
        raise ManifestError(f"{mpath}: no model 'config'") from None
    except (ConfigError, TypeError, AttributeError) as e:
        raise ManifestError(f"{mpath}: malformed model config ({e})") from None
    labels = data.get("labels")
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ManifestError(f"{mpath}: 'labels' must be a list of class names")
    if len(labels) != config.num_classes:
        raise ManifestError(
            f"{mpath}: {len(labels)} labels, but the model has {config.num_classes} classes"
        )
    steps = data.get("T", config.steps)
    if not isinstance(steps, int) or steps < 1:
        raise ManifestError(f"{mpath}: 'T' must be an integer >= 1, got {steps!r}")
    raw_parts = data.get("parts")
    if not isinstance(raw_parts, dict) or set(raw_parts) != set(PART_NAMES):
        got = sorted(raw_parts) if isinstance(raw_parts, dict) else raw_parts
        raise ManifestError(f"{mpath}: 'parts' must hold exactly {list(PART_NAMES)}, got {got}")
    specs = part_specs(config)
    parts = {n: _part_entry(n, raw_parts[n], specs[n], root, str(mpath)) for n in PART_NAMES}
    trt = data.get("tensorrt")
    if isinstance(trt, dict) and trt.get("timing_cache") is not None:
        check_relative_path(trt["timing_cache"], root, what=f"{mpath}: tensorrt timing_cache")
    manifest = Manifest(
        dir=root, data=data, config=config, labels=list(labels), steps=steps, parts=parts,
        _sha256=hashlib.sha256(raw_bytes).hexdigest(),
    )
    if verify:
        problems = verify_files(manifest)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ManifestError(problems[0] + more)
    return manifest


# ------------------------------------------------------------------------------ writing


def tensor_record(t: TensorSpec) -> dict[str, Any]:
    return {"name": t.name, "shape": ["N", *t.shape], "dtype": t.dtype}


def part_record(
    spec: PartSpec, *, files: dict[str, str], root: Path, gmac: float, precision: str,
    opset: int | None = None, exporter: str | None = None, trt: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A part's manifest entry; hashes the files (paths relative to ``root``)."""
    rec: dict[str, Any] = {
        "files": dict(files),
        "sha256": {kind: sha256_file(root / rel) for kind, rel in files.items()},
        "inputs": [tensor_record(t) for t in spec.inputs],
        "outputs": [tensor_record(t) for t in spec.outputs],
        "gmac": gmac,
        "precision": precision,
        "opset": opset,
    }
    if exporter:
        rec["exporter"] = exporter
    rec["trt"] = trt
    return rec


def preprocessing(config: HMSConfig) -> dict[str, Any]:
    """What a runtime needs to turn a video into part inputs (docs/method.md §1), from the config."""
    fe = config.front_end
    vis = {}
    for modality, layout, input_name in (
        ("appearance", "(N, 3, S, S) uint8 RGB", "frame"),
        ("motion", "(N, 3, 32, S, S) uint8 RGB", "clip"),
    ):
        b = config.backbone(modality)
        vis[modality] = {
            "input": input_name, "layout": layout, "resize_short_side": b.resize, "crop": b.crop,
            "mean": list(b.mean), "std": list(b.std), "normalised_in_graph": True,
            "frame": "nearest decoded frame to each timestamp",
        }
    vis["motion"]["clip"] = {
        "frames": config.clip.frames, "stride_s": config.clip.stride_s,
        "slow_frames": config.clip.slow_frames,
        "timestamps": "tau_t + (k - (frames - 1) / 2) * stride_s, clamped to the video",
    }
    return {
        "steps": config.steps,
        "step_centers": "tau_t = (t + 0.5) * D / T, D = video stream duration",
        "audio": {
            "input": "mel", "layout": f"(N, 1, {fe.patch_frames}, {fe.n_mels}) float32 log-mel",
            "sample_rate": fe.sample_rate, "win_length": fe.win_length,
            "hop_length": fe.hop_length, "n_fft": fe.n_fft, "n_mels": fe.n_mels, "fmin": fe.fmin,
            "fmax": fe.fmax, "log_offset": fe.log_offset, "patch_frames": fe.patch_frames,
            "window": "periodic hann, no centring, HTK mel, not normalised",
        },
        **vis,
    }


def write_manifest(dir: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write ``dir/manifest.json`` atomically (temp file + rename); returns its path."""
    root = Path(dir)
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, **data}
    path = root / MANIFEST_NAME
    tmp = root / f".{MANIFEST_NAME}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path

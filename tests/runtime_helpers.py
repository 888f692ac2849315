"""Assets shared by the runtime tests (test_scheduler, test_session, test_run_cli).

Built once per test process (``functools.cache``) in one temporary folder:

- a tiny checkpoint (6 classes, T = 16) whose gates are tuned on the sample video's real
  features so that decisions are mixed (some steps on, some off, motion sometimes on);
- its ONNX export (made with the export engineer's ``hms-export`` API);
- sample videos: with audio (4 s, 15 fps), without audio, and a 6 s 30 fps one with a
  keyframe every 30 frames.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from hms_deploy.checkpoint import init_checkpoint, load_checkpoint, save_checkpoint
from hms_deploy.config import tiny_config
from hms_deploy.data.frame_source import FrameSource
from hms_deploy.data.sampling import StepSampler
from hms_deploy.data.synthetic import render_class_video, write_video
from hms_deploy.data.video import decode_audio, probe
from hms_deploy.model.hms import HMS

STEPS = 16


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Torch on one thread while a runtime test module runs (restored after).

    The tiny model gains nothing from a second thread, and on a shared 2-core machine
    OpenMP's spin-waiting makes torch ~10x slower than one thread when the cores are busy.
    Import this fixture into a test module to use it.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclass(frozen=True)
class Assets:
    root: Path
    checkpoint: Path
    video: Path  # with audio
    silent: Path  # no audio stream
    long: Path  # 6 s, 30 fps, keyframe every 30 frames

    @property
    def engines(self) -> Path:
        return export_dir()


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="hms-runtime-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@torch.no_grad()
def decoded_inputs(video: str | Path, cfg, steps: int) -> dict[str, torch.Tensor]:
    """Every step's part inputs, decoded with the data module (no runtime code).

    ``mel`` (T, 1, 96, 64) float32, ``frame`` (T, 3, S, S) uint8, ``clip`` (T, 3, 32, S, S) uint8.
    """
    info = probe(video)
    sampler = StepSampler.from_config(info, cfg, steps=steps)
    wave, _ = decode_audio(video, cfg.front_end.sample_rate, info=info)
    with FrameSource(info) as src:
        frames = sampler.appearance_inputs(src)
        clips = sampler.motion_inputs(src)
    return {
        "mel": torch.from_numpy(sampler.audio_patches(wave)),
        "frame": torch.from_numpy(frames),
        "clip": torch.from_numpy(clips),
    }


@torch.no_grad()
def raw_features(model: HMS, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Raw backbone features (1, T, D) per modality from :func:`decoded_inputs`, torch encoders."""
    return {
        "audio": model.audio_backbone.encoder(inputs["mel"])[None],
        "appearance": model.appearance_backbone.encoder(inputs["frame"])[None],
        "motion": model.motion_backbone.encoder(inputs["clip"])[None],
    }


@torch.no_grad()
def mix_gates(model: HMS, feats: dict[str, torch.Tensor], *, appearance: float = 0.5,
              motion: float = 0.4, seed: int = 0):
    """Set the gates so that decisions on ``feats`` are mixed; returns the masked forward.

    Random-init backbones give features that barely change from step to step, so each
    gate's "use" logit is made to follow a random direction of p^A (which varies most),
    scaled to unit spread, plus small random weights on its other inputs (states and
    p^I, so decisions also depend on the recurrent state). The "use" bias is then moved
    to the (1 - target) quantile of the observed margins until the fractions are met
    (appearance on ~``appearance`` of the steps, motion on ~``motion`` of those).
    """
    g = torch.Generator().manual_seed(seed)
    p_a = model.project("audio", feats["audio"]).reshape(-1, model.cfg.audio.proj_dim)
    for gate in (model.appearance_gate, model.motion_gate):
        w, b = gate.linear.weight, gate.linear.bias
        w.zero_()
        b.zero_()
        u = torch.randn(p_a.shape[1], generator=g)
        proj = p_a @ u
        w[1, : p_a.shape[1]] = u / proj.std().clamp_min(1e-12)
        rest = w.shape[1] - p_a.shape[1]
        w[1, p_a.shape[1]:] = torch.randn(rest, generator=g) * 0.2 / rest ** 0.5
    out = None
    for _ in range(20):
        margins: dict[str, list[torch.Tensor]] = {"appearance_gate": [], "motion_gate": []}
        hooks = []
        for name, found in margins.items():
            def hook(mod, args, o, found=found):
                found.append(o[1][:, 1] - o[1][:, 0])
            hooks.append(model.part(name).register_forward_hook(hook))
        out = model.masked_forward(feats)
        for h in hooks:
            h.remove()
        a, m = out.appearance.mean().item(), out.motion.sum().item() / max(out.appearance.sum().item(), 1)
        if abs(a - appearance) < 0.15 and abs(m - motion) < 0.2 and out.motion.sum() > 0:
            break
        m_i = torch.cat(margins["appearance_gate"])
        m_m = torch.stack(margins["motion_gate"], 1).flatten()[out.appearance.flatten().bool()]
        model.appearance_gate.linear.bias[1] -= torch.quantile(m_i, 1 - appearance)
        if m_m.numel():
            model.motion_gate.linear.bias[1] -= torch.quantile(m_m, 1 - motion)
    return out


@functools.cache
def assets() -> Assets:
    root = _root()
    video = root / "sample.mp4"
    render_class_video(video, "move_left", seed=3, index=7)
    silent = root / "silent.mp4"
    write_video(
        silent, duration_s=3.0, fps=15, size=(96, 64),
        frame_fn=lambda i, t: np.full((64, 96, 3), (i * 7) % 256, np.uint8),
    )
    long = root / "long.mp4"
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    write_video(
        long, duration_s=6.0, fps=30, gop=30,
        frame_fn=lambda i, t: np.roll(base, 2 * i, axis=1),
        audio_fn=lambda t: 0.3 * np.sin(2 * np.pi * 440.0 * t),
    )

    torch.manual_seed(0)
    ckpt = init_checkpoint(tiny_config(6, steps=STEPS), seed=0)
    model = ckpt.build_model()
    feats = raw_features(model, decoded_inputs(video, model.cfg, STEPS))
    out = mix_gates(model, feats)
    a, m = out.appearance.sum().item(), out.motion.sum().item()
    assert 0 < a < STEPS and 0 < m < a, f"gates not mixed: appearance {a}, motion {m}"
    ckpt.state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_checkpoint(ckpt, root / "tiny.pt")
    return Assets(root=root, checkpoint=path, video=video, silent=silent, long=long)


@functools.cache
def export_dir() -> Path:
    """The ONNX export of :func:`assets`'s checkpoint."""
    from hms_deploy.export.pipeline import ExportOptions, export_checkpoint
    from hms_deploy.export.validate import ValidationOptions

    out = _root() / "engines"
    check = ValidationOptions(video=assets().video, steps=4, random_batches=(1, 2))
    export_checkpoint(assets().checkpoint, out, ExportOptions(validation=check))
    return out


@functools.cache
def emulated_export_dir() -> Path:
    """:func:`export_dir` with TensorRT plans built by tests/trt_emulator.py (TensorRT 11)."""
    from trt_emulator import emulated_export

    return emulated_export(export_dir(), _root() / "engines-trt-emulated")


def load_model(path: str | Path) -> HMS:
    return load_checkpoint(path).build_model()


def make_videos(folder: Path, n: int, *, corrupt: tuple[int, ...] = ()) -> list[Path]:
    """``n`` copies of the sample video (distinct names); indices in ``corrupt`` are broken."""
    folder.mkdir(parents=True, exist_ok=True)
    src = assets().video.read_bytes()
    paths = []
    for i in range(n):
        p = folder / f"v{i:02d}.mp4"
        if i in corrupt:
            # alternately: not media at all, and a truncated MP4 (header without data)
            p.write_bytes(b"not a video\n" * 10 if i % 2 else src[: len(src) // 20])
        else:
            p.write_bytes(src)
        paths.append(p)
    return paths


def ordered(obj):
    """``obj`` with every dict as its (key, value) list and every leaf with its type name:
    equal only if keys, key order, values and types are (``1 == 1.0 == True`` otherwise)."""
    if isinstance(obj, dict):
        return [(k, ordered(v)) for k, v in obj.items()]
    if isinstance(obj, list):
        return [ordered(v) for v in obj]
    return (type(obj).__name__, obj)

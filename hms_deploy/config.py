"""Frozen configuration of an HMS model: dimensions, steps, and preprocessing per backbone.

Preprocessing travels with the weights: everything a runtime needs to turn a video into
part inputs lives here, is stored in the checkpoint and copied into the export manifest.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hms_deploy.errors import ConfigError

MODALITIES = ("audio", "appearance", "motion")
MODALITY_LETTERS = {"A": "audio", "I": "appearance", "M": "motion"}
MOTION_CROPS = (224, 256)  # the paper variant's SlowFast crop sizes (pixels); the first is the default


def parse_modalities(text: str | Sequence[str]) -> list[str]:
    """``"A+I+M"`` / ``"audio+motion"`` / ``["audio", "motion"]`` -> names in canonical order."""
    parts = text.split("+") if isinstance(text, str) else list(text)
    names = []
    for p in parts:
        p = p.strip()
        name = MODALITY_LETTERS.get(p.upper(), p.lower()) if p else ""
        if name not in MODALITIES:
            raise ConfigError(
                f"unknown modality {p!r} in {text!r}; expected a '+'-joined subset of "
                "A, I, M (or audio, appearance, motion)", setting="modalities", value=text
            )
        names.append(name)
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"modalities {text!r}: need a non-empty subset without repeats",
                          setting="modalities", value=text)
    return [m for m in MODALITIES if m in names]


def modalities_tag(modalities: Sequence[str]) -> str:
    """``["audio", "motion"]`` -> ``"A+M"``."""
    inv = {v: k for k, v in MODALITY_LETTERS.items()}
    return "+".join(inv[m] for m in MODALITIES if m in modalities)


@dataclass(frozen=True)
class AudioFrontEnd:
    """The VGGish log-mel front end (docs/method.md §1)."""

    sample_rate: int = 16000
    win_length: int = 400  # 25 ms periodic Hann window
    hop_length: int = 160  # 10 ms
    n_fft: int = 512
    n_mels: int = 64
    fmin: float = 125.0
    fmax: float = 7500.0
    log_offset: float = 0.01
    patch_frames: int = 96  # 0.96 s per step


@dataclass(frozen=True)
class BackboneConfig:
    """One modality's backbone, its raw feature width and its projection.

    ``arch`` names the builder in :mod:`hms_deploy.model.backbones` (a literal table).
    ``resize``/``crop`` are the short-side resize and centre crop in pixels (visual only);
    ``mean``/``std`` are in [0, 1] RGB units and applied inside the graph.
    """

    arch: str
    feat_dim: int
    proj_dim: int
    crop: int = 0
    resize: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    width: int = 0  # tiny builders only: base channel count


@dataclass(frozen=True)
class MotionClip:
    """The SlowFast 8x8 clip geometry (docs/method.md §1)."""

    frames: int = 32
    stride_s: float = 2.0 / 30.0
    slow_frames: int = 8


@dataclass(frozen=True)
class HMSConfig:
    """Everything that defines an HMS model and its preprocessing."""

    variant: str
    num_classes: int
    audio: BackboneConfig
    appearance: BackboneConfig
    motion: BackboneConfig
    hidden_audio: int
    hidden_appearance: int
    hidden_motion: int
    steps: int = 128
    front_end: AudioFrontEnd = field(default_factory=AudioFrontEnd)
    clip: MotionClip = field(default_factory=MotionClip)

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {self.num_classes}")
        if not self.hidden_audio <= self.hidden_appearance <= self.hidden_motion:
            raise ConfigError(
                "hidden sizes must satisfy H_A <= H_I <= H_M, got "
                f"{self.hidden_audio}, {self.hidden_appearance}, {self.hidden_motion}"
            )
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")

    def backbone(self, modality: str) -> BackboneConfig:
        if modality not in MODALITIES:
            raise ConfigError(f"unknown modality {modality!r}, expected one of {MODALITIES}")
        backbone: BackboneConfig = getattr(self, modality)
        return backbone

    @property
    def hidden(self) -> dict[str, int]:
        return {
            "audio": self.hidden_audio,
            "appearance": self.hidden_appearance,
            "motion": self.hidden_motion,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (safe for ``torch.load(weights_only=True)`` and JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HMSConfig:
        try:
            d = dict(d)
            for key in MODALITIES:
                b = dict(d[key])
                b["mean"] = tuple(b.get("mean", ()))
                b["std"] = tuple(b.get("std", ()))
                d[key] = BackboneConfig(**b)
            d["front_end"] = AudioFrontEnd(**d.get("front_end", {}))
            d["clip"] = MotionClip(**d.get("clip", {}))
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"malformed model config: {e}") from e

    def replace(self, **changes: Any) -> HMSConfig:
        return dataclasses.replace(self, **changes)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINETICS_MEAN = (0.45, 0.45, 0.45)
KINETICS_STD = (0.225, 0.225, 0.225)


def paper_config(num_classes: int, *, steps: int = 128, motion_crop: int = MOTION_CROPS[0]
                 ) -> HMSConfig:
    """The paper's model: MobileNetV1 audio, EfficientNet-B3 appearance, SlowFast R50 motion."""
    if motion_crop not in MOTION_CROPS:
        raise ConfigError(f"motion crop must be 224 or 256, got {motion_crop}",
                          setting="motion_crop", value=motion_crop, expected="224 or 256")
    return HMSConfig(
        variant="paper",
        num_classes=num_classes,
        # EfficientNet-B3's timm pretrained_cfg: 300 px test size, but docs/method.md §1 uses 224.
        audio=BackboneConfig(arch="mobilenetv1_100", feat_dim=1024, proj_dim=512),
        appearance=BackboneConfig(
            arch="efficientnet_b3", feat_dim=1536, proj_dim=1024, crop=224, resize=256,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
        ),
        motion=BackboneConfig(
            arch="slowfast_r50", feat_dim=2304, proj_dim=2048, crop=motion_crop,
            resize=motion_crop * 256 // 224, mean=KINETICS_MEAN, std=KINETICS_STD,
        ),
        hidden_audio=128,
        hidden_appearance=512,
        hidden_motion=2048,
        steps=steps,
    )


def tiny_config(num_classes: int, *, steps: int = 16) -> HMSConfig:
    """Same nine parts and front-end geometry, small widths: well under 1 s/video on 2 CPU cores."""
    return HMSConfig(
        variant="tiny",
        num_classes=num_classes,
        audio=BackboneConfig(arch="tiny_audio", feat_dim=64, proj_dim=32, width=4),
        appearance=BackboneConfig(
            arch="tiny_appearance", feat_dim=128, proj_dim=64, crop=64, resize=72,
            mean=IMAGENET_MEAN, std=IMAGENET_STD, width=16,
        ),
        motion=BackboneConfig(
            arch="tiny_slowfast", feat_dim=192, proj_dim=96, crop=64, resize=72,
            mean=KINETICS_MEAN, std=KINETICS_STD, width=8,
        ),
        hidden_audio=32,
        hidden_appearance=64,
        hidden_motion=128,
        steps=steps,
    )


VARIANTS = {"paper": paper_config, "tiny": tiny_config}


def make_config(variant: str, num_classes: int, **kwargs: Any) -> HMSConfig:
    """The config of ``variant`` (:data:`VARIANTS`) with its settings ``kwargs`` (e.g.
    ``steps``; ``motion_crop`` for paper); a setting the variant does not have is refused."""
    import inspect

    try:
        builder = VARIANTS[variant]
    except KeyError:
        raise ConfigError(
            f"unknown variant {variant!r}, expected one of {sorted(VARIANTS)}", value=variant
        ) from None
    foreign = sorted(set(kwargs) - set(inspect.signature(builder).parameters))
    if foreign:
        raise ConfigError(f"{', '.join(foreign)}: not a setting of variant {variant}",
                          setting=(*foreign, "variant"), value=variant)
    return builder(num_classes, **kwargs)

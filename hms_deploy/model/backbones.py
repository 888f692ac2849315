"""Backbone builders (a literal table) and the encoders that wrap them.

An *encoder* maps a part's raw input to the raw backbone feature x (before projection):

- audio:      ``mel`` (N, 1, 96, 64) float32 log-mel        -> (N, feat_dim)
- appearance: ``frame`` (N, 3, S, S) uint8 RGB, resized+cropped -> (N, feat_dim)
- motion:     ``clip`` (N, 3, 32, S, S) uint8 RGB             -> (N, feat_dim)

Visual encoders normalise inside (uint8 -> [0, 1] -> mean/std), so normalisation exists
once and travels into the exported graphs. The motion encoder does SlowFast's PackPathway
(8 slow frames chosen by :func:`slow_indices` over the 32) inside.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from hms_deploy.config import BackboneConfig, MotionClip
from hms_deploy.errors import ConfigError


def _pytorchvideo_compat() -> None:
    """pytorchvideo 0.1.5 imports a torchvision module that was renamed."""
    if "torchvision.transforms.functional_tensor" not in sys.modules:
        import torchvision.transforms._functional_tensor as ft

        sys.modules["torchvision.transforms.functional_tensor"] = ft


def slow_indices(frames: int = 32, slow: int = 8) -> list[int]:
    """pytorchvideo ``PackPathway``'s slow-pathway choice: ``torch.linspace(0, frames-1, slow).long()``.

    For 32 / 8: ``[0, 4, 8, 13, 17, 22, 26, 31]``.
    """
    if frames < 1 or slow < 1:
        raise ConfigError(f"frames and slow must be >= 1, got {frames}, {slow}")
    return torch.linspace(0, frames - 1, slow).long().tolist()


# ---------------------------------------------------------------------------- paper nets


def _timm(name: str, in_chans: int) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, in_chans=in_chans, num_classes=0)


def _slowfast_r50() -> nn.Module:
    """pytorchvideo SlowFast R50 8x8 returning the 2304-d pooled feature."""
    _pytorchvideo_compat()
    from pytorchvideo.models.hub import slowfast_r50
    from pytorchvideo.models.net import MultiPathWayWithFuse

    net = slowfast_r50(pretrained=False)
    net.blocks[-1].proj = nn.Identity()
    for m in net.modules():
        # inplace=True overwrites the caller's pathway list (a second call crashes).
        if isinstance(m, MultiPathWayWithFuse):
            m.inplace = False
    return net


# ----------------------------------------------------------------------------- tiny nets


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class TinyConvNet(nn.Module):
    """A small 2-D CNN: four stride-2 conv blocks, global average pool, linear to feat_dim."""

    def __init__(self, in_chans: int, width: int, feat_dim: int):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(in_chans, w, 2), _conv_bn(w, 2 * w, 2), _conv_bn(2 * w, 4 * w, 2),
            _conv_bn(4 * w, 8 * w, 2),
        )
        self.fc = nn.Linear(8 * w, feat_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class _Pathway3d(nn.Module):
    def __init__(self, cin: int, width: int, t_kernel: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = cin
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            layers += [
                nn.Conv3d(c, cout, (t_kernel, 3, 3), (1, 2, 2), (t_kernel // 2, 1, 1), bias=False),
                nn.BatchNorm3d(cout),
                nn.ReLU(),
            ]
            c = cout
        self.net = nn.Sequential(*layers)
        self.out_chans = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(2, 3, 4))


def motion_filters(out_chans: int, in_chans: int = 3) -> torch.Tensor:
    """A bank of oriented spatio-temporal derivative filters, ``(out, in, 3, 3, 3)``.

    With ``D = [-1, 0, 1]`` and ``B = [1, 2, 1] / 4`` along (t, y, x): ``T = D x B x B``
    (change over time), ``X = B x B x D`` and ``Y = B x D x B`` (change along x and y).
    For a pattern moving at v pixels per frame, ``T ~ -v X``, so ``T + X ~ (1 - v) X``
    and ``T - X ~ (-1 - v) X``: after a ReLU and a spatial average their magnitudes differ
    with the direction of motion (a linear motion-energy pair). The bank cycles through
    ``T + X, T - X, T + Y, T - Y`` and their negatives (both contrast polarities), the
    same on every (luminance-like) input channel, each scaled to unit norm.
    """
    d = torch.tensor([-1.0, 0.0, 1.0])
    b = torch.tensor([1.0, 2.0, 1.0]) / 4
    t = torch.einsum("t,y,x->tyx", d, b, b)
    x = torch.einsum("t,y,x->tyx", b, b, d)
    y = torch.einsum("t,y,x->tyx", b, d, b)
    base = [t + x, t - x, t + y, t - y]
    bank = base + [-f for f in base]
    w = torch.stack([bank[i % len(bank)] for i in range(out_chans)])
    w = w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return w.unsqueeze(1).expand(out_chans, in_chans, 3, 3, 3) / in_chans**0.5


_BANK = 8  # motion_filters' distinct filters (4 orientations x 2 polarities)
ENERGY_FEATURES = 8  # TinySlowFast features that start as motion energies (init_structured)


class TinySlowFast(nn.Module):
    """A two-pathway 3-D CNN with SlowFast's interface: ``forward([slow, fast])``.

    The slow pathway is wide with a temporal kernel of 1; the fast one is narrow
    (1/4 width) with a temporal kernel of 3, like SlowFast's channel ratio.

    ``tiny`` has no pretrained weights; :meth:`init_structured` stands in for the
    direction-selective motion features that pretrained SlowFast (``paper``) brings from
    Kinetics, on top of PyTorch's default random init:

    - the fast pathway's first convolution starts as :func:`motion_filters` (a random
      8-channel first layer is rarely direction-selective, so fine-tuning the motion
      encoder on classes that differ only in drift direction can stall);
    - the fast pathway's later convolutions pass the first layer's channels through
      (a centre tap of 1; their other channels stay random), so its pooled output
      carries the pooled motion energies;
    - the last :data:`ENERGY_FEATURES` rows of ``fc`` read them: opponent energy along x
      (leftward minus rightward, both contrast polarities), along y, then the first
      six energies as they are. Without these rows the direction is one weak component
      mixed by ``fc`` into every feature together with the look of the clip (the slow
      pathway), and HMS, trained on frozen features, fits its training videos by their
      look before their drift (``benchmarks/results/demo_diagnosis.md``).

    Every weight is trained like any other by a fine-tune.
    """

    def __init__(self, width: int, feat_dim: int):
        super().__init__()
        self.slow = _Pathway3d(3, 4 * width, 1)
        self.fast = _Pathway3d(3, width, 3)
        self.fc = nn.Linear(self.slow.out_chans + self.fast.out_chans, feat_dim)
        self.init_structured()

    def init_structured(self) -> None:
        """The structured start (class docstring): the first fast filters are
        :func:`motion_filters` at the mean norm of the current (default-initialised)
        filters, the later fast convolutions pass those channels through, and the last
        :data:`ENERGY_FEATURES` rows of ``fc`` read the motion energies (the last two
        only when the fast pathway holds the whole bank of 8 filters and ``fc`` has at
        least ``2 * ENERGY_FEATURES`` outputs). Called after any
        re-draw of the random weights (see :func:`hms_deploy.train.finetune._restart`)."""
        convs = [m for m in self.fast.net if isinstance(m, nn.Conv3d)]
        first = convs[0]
        assert first.kernel_size == (3, 3, 3)
        k = first.out_channels
        with torch.no_grad():
            scale = first.weight.flatten(1).norm(dim=1).mean()
            first.weight.copy_(motion_filters(k, first.in_channels) * scale)
            if k < _BANK or self.fc.out_features < 2 * ENERGY_FEATURES:
                return  # too narrow for the whole bank (widths below tiny's): filters only
            for conv in convs[1:]:
                conv.weight[:k] = 0.0
                centre = tuple(s // 2 for s in conv.kernel_size)
                for i in range(k):
                    conv.weight[(i, i, *centre)] = 1.0
            energy = self.slow.out_chans + torch.arange(_BANK)  # fc inputs: bank order
            rows = self.fc.weight[-ENERGY_FEATURES:]
            rows.zero_()
            self.fc.bias[-ENERGY_FEATURES:] = 0.0
            # bank order: T+X, T-X, T+Y, T-Y, then the four negated (the other polarity)
            rows[0, energy[[0, 4]]], rows[0, energy[[1, 5]]] = 1.0, -1.0  # left - right
            rows[1, energy[[2, 6]]], rows[1, energy[[3, 7]]] = 1.0, -1.0  # along y
            for j in range(ENERGY_FEATURES - 2):
                rows[2 + j, energy[j]] = 1.0

    def forward(self, pathways: list[torch.Tensor]) -> torch.Tensor:
        slow, fast = pathways
        return self.fc(torch.cat([self.slow(slow), self.fast(fast)], dim=1))


# --------------------------------------------------------------------------- the table

BUILDERS: dict[str, Callable[[BackboneConfig], nn.Module]] = {
    "mobilenetv1_100": lambda cfg: _timm("mobilenetv1_100", 1),
    "efficientnet_b3": lambda cfg: _timm("efficientnet_b3", 3),
    "slowfast_r50": lambda cfg: _slowfast_r50(),
    "tiny_audio": lambda cfg: TinyConvNet(1, cfg.width, cfg.feat_dim),
    "tiny_appearance": lambda cfg: TinyConvNet(3, cfg.width, cfg.feat_dim),
    "tiny_slowfast": lambda cfg: TinySlowFast(cfg.width, cfg.feat_dim),
}


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    try:
        builder = BUILDERS[cfg.arch]
    except KeyError:
        raise ConfigError(
            f"unknown backbone arch {cfg.arch!r}, expected one of {sorted(BUILDERS)}"
        ) from None
    return builder(cfg)


# ----------------------------------------------------------------------------- encoders


class _Normalize(nn.Module):
    """uint8 RGB -> float in [0, 1] -> (x - mean) / std, channel axis 1."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], ndim: int):
        super().__init__()
        shape = (1, 3) + (1,) * (ndim - 2)
        scale = torch.tensor(std, dtype=torch.float32).reshape(shape) * 255.0
        self.mean255: torch.Tensor
        self.scale255: torch.Tensor
        self.register_buffer("mean255", torch.tensor(mean).reshape(shape) * 255.0, False)
        self.register_buffer("scale255", scale, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.mean255.dtype) - self.mean255) / self.scale255


class AudioEncoder(nn.Module):
    """``mel`` (N, 1, 96, 64) float32 -> x^A (N, feat_dim); the log-mel goes in as is."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.net = build_backbone(cfg)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.net(mel)


class FrameEncoder(nn.Module):
    """``frame`` (N, 3, S, S) uint8 -> x^I (N, feat_dim)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.normalize = _Normalize(cfg.mean, cfg.std, 4)
        self.net = build_backbone(cfg)

    def forward(self, frame: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(frame))


class ClipEncoder(nn.Module):
    """``clip`` (N, 3, 32, S, S) uint8 -> x^M (N, feat_dim), PackPathway inside."""

    def __init__(self, cfg: BackboneConfig, clip: MotionClip):
        super().__init__()
        self.normalize = _Normalize(cfg.mean, cfg.std, 5)
        self.net = build_backbone(cfg)
        slow = torch.tensor(slow_indices(clip.frames, clip.slow_frames), dtype=torch.int64)
        self.register_buffer("slow_index", slow, False)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        fast = self.normalize(clip)
        slow = fast.index_select(2, self.slow_index)
        return self.net([slow, fast])

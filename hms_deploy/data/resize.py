"""Short-side resize and centre crop of decoded RGB frames (the backbones' preprocessing)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from hms_deploy.errors import ConfigError


def resized_size(height: int, width: int, resize_short: int) -> tuple[int, int]:
    """(height, width) after a short-side resize, torchvision's rule: long = int(s * long / short)."""
    if height <= width:
        return resize_short, int(resize_short * width / height)
    return int(resize_short * height / width), resize_short


def _resize_crop_nhwc(frames: NDArray[np.uint8], resize_short: int, crop: int) -> NDArray[np.uint8]:
    import torch
    import torch.nn.functional as F

    if resize_short < 1 or crop < 1 or crop > resize_short:
        raise ConfigError(
            f"resize/crop must satisfy 1 <= crop <= resize, got resize={resize_short}, crop={crop}"
        )
    _, h, w, _ = frames.shape
    nh, nw = resized_size(h, w, resize_short)
    # (N, H, W, 3) memory viewed as channels-last NCHW: torch's native uint8 kernel
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = round((nh - crop) / 2.0), round((nw - crop) / 2.0)
    return x[:, :, top : top + crop, left : left + crop].contiguous().numpy()


def _check_hwc(frame: NDArray[np.generic], what: str = "frame") -> None:
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"{what} has shape {frame.shape} {frame.dtype}, expected (H, W, 3) uint8")


def resize_center_crop(frame: NDArray[np.uint8], resize_short: int, crop: int) -> NDArray[np.uint8]:
    """Short-side resize then centre crop of one RGB frame.

    Bilinear ``torch.nn.functional.interpolate(antialias=True, align_corners=False)``
    run directly on uint8 (torch's native uint8 kernel, the one torchvision's
    ``Resize(resize_short, antialias=True)`` uses on uint8 tensors; it is ~15x faster than
    the float path and differs from float-then-round by at most 1), then
    ``CenterCrop(crop)``. The long side becomes ``int(resize_short * long / short)``.

    Args:
        frame: ``(H, W, 3)`` uint8 RGB.
    Returns:
        ``(3, crop, crop)`` uint8 RGB, channels first.
    """
    _check_hwc(frame)
    out: NDArray[np.uint8] = _resize_crop_nhwc(frame[None], resize_short, crop)[0]
    return out


def resize_center_crop_batch(
    frames: Sequence[NDArray[np.uint8]], resize_short: int, crop: int
) -> NDArray[np.uint8]:
    """:func:`resize_center_crop` over frames of one size: ``(N, 3, crop, crop)`` uint8."""
    if len(frames) == 0:
        return np.zeros((0, 3, crop, crop), dtype=np.uint8)
    for f in frames:
        _check_hwc(f)
    if len({f.shape for f in frames}) != 1:
        raise ValueError(f"frames differ in size: {sorted({f.shape for f in frames})}")
    return _resize_crop_nhwc(np.stack(frames), resize_short, crop)

"""hms-deploy: train, export and serve Hierarchical Modality Selection video classifiers.

Importing this package is cheap: it does not import onnxruntime, tensorrt or the video
stack. Heavy modules load on first use.
"""

from __future__ import annotations

from typing import Any

from hms_deploy.version import __version__

__all__ = ["__version__", "log_mel_spectrogram"]


def __getattr__(name: str) -> Any:
    if name == "log_mel_spectrogram":
        from hms_deploy.data.audio import log_mel_spectrogram

        return log_mel_spectrogram
    raise AttributeError(f"module 'hms_deploy' has no attribute {name!r}")

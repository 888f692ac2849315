"""The settings of a served model, declared once: what ``config.pbtxt`` holds
(:class:`RepositoryOptions`, the defaults and checks hms-serve and hms-export
``--triton-repo`` use and show in their help) and the upload limit the handler enforces.
Apart from the run settings (:mod:`hms_deploy.runtime.options`), it imports none of the
serving code."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hms_deploy.errors import ConfigError
from hms_deploy.runtime.options import RunSettings

DEFAULT_MAX_UPLOAD_BYTES = 512 << 20  # 512 MiB


@dataclass(frozen=True)
class RepositoryOptions:
    """Settings written into ``config.pbtxt``."""

    engine: str = "onnx"
    device: str = "cpu"
    max_batch: int = 8
    max_queue_delay_us: int = 2000
    instances: int = 1
    allowed_root: Path | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    threads: int | None = None
    run: RunSettings = field(default_factory=RunSettings)  # its topk and steps (T; None: the model's)
    stop_file: Path | None = None  # hms-serve's drain signal (see triton_model)
    upload_dir: Path | None = None  # where uploads are written (None: the stub's temp dir)

    def check(self) -> None:
        if self.engine not in ("onnx", "trt"):
            raise ConfigError(f"engine must be onnx or trt for serving an export, got {self.engine!r}")
        for name, value, low in (("max_batch", self.max_batch, 1), ("instances", self.instances, 1),
                                 ("max_queue_delay_us", self.max_queue_delay_us, 0),
                                 ("max_upload_bytes", self.max_upload_bytes, 1)):
            if value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}", setting=name,
                                  value=value, expected=f">= {low}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}", setting="threads",
                              value=self.threads, expected=">= 1")
        if self.allowed_root is not None and not Path(self.allowed_root).is_dir():
            raise ConfigError(f"allowed root '{self.allowed_root}' is not a directory")

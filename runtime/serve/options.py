"""The settings of a served model, declared once: what ``config.pbtxt`` holds
(:class:`RepositoryOptions`, the defaults and checks hms-serve and hms-export
``--triton-repo`` use and show in their help) and the upload limit the handler enforces.
Apart from the run settings (:mod:`hms_deploy.runtime.options`), it imports none of the
serving code."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hms_deploy.errors import ConfigError, require_at_least
from hms_deploy.runtime.engines import DEFAULT_DEVICE, device_of
from hms_deploy.runtime.options import RunSettings

DEFAULT_MAX_UPLOAD_BYTES = 512 << 20  # 512 MiB


@dataclass(frozen=True)
class RepositoryOptions:
    """Settings written into ``config.pbtxt``; the model's :class:`Handler
    <hms_deploy.runtime.serve.handler.Handler>` enforces allowed_root, max_upload_bytes,
    run and upload_dir on every request."""

    engine: str = "onnx"
    device: str = DEFAULT_DEVICE
    max_batch: int = 8
    max_queue_delay_us: int = 2000
    instances: int = 1
    allowed_root: Path | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    threads: int | None = None
    run: RunSettings = field(default_factory=RunSettings)  # its topk and steps (T; None: the model's)
    stop_file: Path | None = None  # hms-serve's drain signal (see triton_model)
    upload_dir: Path | None = None  # where uploads are written (None: the stub's temp dir)

    def to_params(self, engines_dir: str) -> dict[str, str]:
        """The ``parameters`` of ``config.pbtxt`` (strings; empty: None) the model reads
        back with :meth:`from_params`; ``engines_dir`` is the export, relative to the
        version directory or absolute."""
        return {
            "engines_dir": engines_dir, "engine": self.engine, "device": self.device,
            "allowed_root": str(Path(self.allowed_root).resolve()) if self.allowed_root else "",
            "max_upload_bytes": str(self.max_upload_bytes), "threads": str(self.threads or ""),
            "topk": str(self.run.topk), "stop_file": str(self.stop_file or ""),
            "steps": str(self.run.steps or ""), "upload_dir": str(self.upload_dir or ""),
        }

    @classmethod
    def from_params(cls, params: dict[str, str]) -> RepositoryOptions:
        """The settings :meth:`to_params` wrote (a missing or empty one: the default);
        those outside ``parameters`` (max_batch, max_queue_delay_us, instances) are left
        at their defaults."""
        def text(name: str) -> str | None:
            return params.get(name) or None

        def number(name: str) -> int | None:
            value = text(name)
            return None if value is None else int(value)

        def path(name: str) -> Path | None:
            value = text(name)
            return None if value is None else Path(value)

        default = cls()
        return cls(
            engine=text("engine") or default.engine, device=text("device") or default.device,
            allowed_root=path("allowed_root"),
            max_upload_bytes=number("max_upload_bytes") or default.max_upload_bytes,
            threads=number("threads"),
            run=RunSettings(topk=number("topk") or default.run.topk, steps=number("steps")),
            stop_file=path("stop_file"), upload_dir=path("upload_dir"),
        )

    def check(self) -> None:
        if self.engine not in ("onnx", "trt"):
            raise ConfigError(f"engine must be onnx or trt for serving an export, got {self.engine!r}",
                              setting="engine", value=self.engine, expected="onnx or trt")
        device_of(self.device)
        for name, value, low in (("max_batch", self.max_batch, 1), ("instances", self.instances, 1),
                                 ("max_queue_delay_us", self.max_queue_delay_us, 0),
                                 ("max_upload_bytes", self.max_upload_bytes, 1),
                                 ("threads", self.threads, 1)):
            require_at_least(name, value, low)
        if self.allowed_root is not None and not Path(self.allowed_root).is_dir():
            raise ConfigError(f"allowed root '{self.allowed_root}' is not a directory")

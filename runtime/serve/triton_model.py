"""The Triton Python-backend model ``hms``: the runtime's :class:`Session` behind Triton.

A model repository's ``hms/1/model.py`` re-exports :class:`TritonPythonModel` from here
(:mod:`hms_deploy.runtime.serve.repository`). Settings come from ``config.pbtxt``
``parameters`` (strings): ``engines_dir`` (relative to the version directory, or
absolute), ``engine``, ``device``, ``allowed_root`` (empty: no ``path`` inputs),
``max_upload_bytes``, ``threads`` (ONNX Runtime intra-op threads; empty: all cores),
``topk``, ``steps`` (T of every request; empty: the model's), ``upload_dir`` (where
uploads are written while their batch runs; empty: the temp dir), ``stop_file`` (see below).
With ``device`` ``cuda`` each instance opens ``cuda:{model_instance_device_id}``, the GPU
Triton gave it (``instance_group`` ``KIND_GPU``).

Draining (``hms-serve``): on SIGTERM, hms-serve writes a deadline (Unix time) into
``stop_file`` and signals Triton, which refuses new connections but keeps serving open
ones until they close or its exit timeout passes. Batches that start before the
deadline are answered as usual; later ones are refused with UNAVAILABLE ("shutting
down"), so the server is idle, and no accepted request is cut off, when Triton exits.

Each ``execute`` call receives the requests of one dynamic batch and answers every one:
:class:`~hms_deploy.runtime.serve.handler.Handler` steps the valid ones in lockstep and
a bad request gets an error response (one line) without failing the others; every
answer is counted on Triton's metrics port (:mod:`~hms_deploy.runtime.serve.metrics`).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from hms_deploy.runtime.serve import ENGINES_DIR, INPUTS
from hms_deploy.runtime.serve.handler import INTERNAL_PREFIX, Handler, outputs
from hms_deploy.runtime.serve.metrics import ServeMetrics
from hms_deploy.runtime.serve.options import RepositoryOptions


def parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """``parameters`` of a model config (as JSON) -> {key: string value}."""
    return {k: str(v.get("string_value", "")) for k, v in model_config.get("parameters", {}).items()}


def instance_device(device: str, instance_device_id: str | None) -> str:
    """The device of one model instance: ``cuda`` becomes ``cuda:{model_instance_device_id}``
    (the GPU Triton placed this instance on); an explicit index or a CPU device is kept."""
    if device == "cuda" and instance_device_id not in (None, ""):
        return f"cuda:{int(instance_device_id)}"
    return device


def open_handler(params: dict[str, str], version_dir: Path, instance_device_id: str | None = None) -> Handler:
    """An opened Session and its Handler from the model's parameters (on the instance's GPU)."""
    from hms_deploy.runtime.session import Session

    options = RepositoryOptions.from_params(params)
    engines = Path(params.get("engines_dir") or ENGINES_DIR)
    if not engines.is_absolute():
        engines = version_dir / engines
    extra: dict[str, Any] = {}
    if options.threads is not None and options.engine == "onnx":
        extra["threads"] = options.threads
    device = instance_device(options.device, instance_device_id)
    session = Session(engines_dir=engines, engine=options.engine, device=device, **extra)
    session.open()
    return Handler(session, options)


def _error(pb_utils: Any, message: str) -> Any:
    """A TritonError: INVALID_ARG (HTTP 400) for a bad request, INTERNAL (500) otherwise."""
    codes = getattr(pb_utils.TritonError, "INVALID_ARG", None), getattr(pb_utils.TritonError, "INTERNAL", None)
    code = codes[1] if message.startswith(INTERNAL_PREFIX) else codes[0]
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


class TritonPythonModel:
    """Triton's Python-backend entry points (``initialize``, ``execute``, ``finalize``)."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        params = parameters(config)
        self.handler = open_handler(params, version_dir, args.get("model_instance_device_id"))
        self.stop_file = self.handler.options.stop_file
        self.metrics = None
        with contextlib.suppress(ImportError):
            import triton_python_backend_utils as pb_utils  # only inside the backend's stub

            self.metrics = ServeMetrics.create(pb_utils)

    def draining(self) -> bool:
        """Past hms-serve's drain deadline (new batches are refused)."""
        if self.stop_file is None:
            return False
        try:
            deadline = float(self.stop_file.read_text() or 0)
        except (OSError, ValueError):
            return False
        return time.time() >= deadline

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils  # only inside the backend's stub

        if self.draining():  # one error object per response: a shared one crashes the backend
            code = getattr(pb_utils.TritonError, "UNAVAILABLE", None)
            msg = "server is shutting down: request refused (retry on another server)"
            if self.metrics is not None:
                self.metrics.refused(len(requests))
            return [pb_utils.InferenceResponse(
                error=pb_utils.TritonError(msg) if code is None else pb_utils.TritonError(msg, code)
            ) for _ in requests]
        batch = []
        for req in requests:
            inputs = {}
            for name in INPUTS:
                t = pb_utils.get_input_tensor_by_name(req, name)
                inputs[name] = None if t is None else t.as_numpy()
            batch.append(inputs)
        responses = []
        for answer in self.handler.answer(batch):
            if self.metrics is not None:
                self.metrics.count(answer)  # from the records, before they are serialised
            if isinstance(answer, str):
                responses.append(pb_utils.InferenceResponse(error=_error(pb_utils, answer)))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs(answer).items()]
                ))
        return responses

    def finalize(self) -> None:
        self.handler.session.close()

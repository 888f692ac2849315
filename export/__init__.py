"""``hms_deploy.export``: the nine parts of an HMS checkpoint -> ONNX (+ TensorRT plans).

Modules (importing this package imports none of them; nothing here imports onnxruntime
or tensorrt until used):

- :mod:`.modules`   the torch modules of the parts bound to :mod:`hms_deploy.parts` specs
- :mod:`.onnx`      export one part (legacy exporter, dynamic batch ``N``), fp16, checks
- :mod:`.validate`  parity of the export with PyTorch (stored in the manifest)
- :mod:`.tensorrt`  build and check TensorRT plans (TensorRT 10/11, lazy import)

What the runtime shares with the export lives below it, in the runtime:
``manifest.json``'s format (:mod:`hms_deploy.runtime.manifest`) and the TensorRT-free plan
logic (:mod:`hms_deploy.runtime.trt_plan`); dtype tables are :mod:`hms_deploy.dtypes`.
Nothing under ``hms_deploy`` core or ``runtime`` imports this package: where the runtime
needs the export (plans built on first ``--engine trt`` use) the caller hands it
:func:`add_trt_plans`.
- :mod:`.pipeline`  ``export_checkpoint`` / ``add_trt_plans``: what ``hms-export`` runs

Typical use::

    from hms_deploy.export import export_checkpoint, load_manifest
    man = export_checkpoint("ckpt.pt", "engines")      # validated, atomic
    man = load_manifest("engines")                      # hashes verified
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExportOptions", "Manifest", "add_trt_plans", "export_checkpoint", "load_manifest"]


def __getattr__(name: str) -> Any:
    if name in ("export_checkpoint", "add_trt_plans", "ExportOptions"):
        from hms_deploy.export import pipeline

        return getattr(pipeline, name)
    if name in ("load_manifest", "Manifest"):
        from hms_deploy.runtime import manifest

        return getattr(manifest, name)
    raise AttributeError(f"module 'hms_deploy.export' has no attribute {name!r}")

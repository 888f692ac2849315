"""The HMS runtime: engines, the step scheduler that really skips, and the inference API.

Public API (importing this package loads neither onnxruntime nor tensorrt)::

    from hms_deploy.runtime import Session
    with Session(engines_dir="engines/") as s:
        record = s.classify("video.mp4")

- :class:`Session` (:mod:`hms_deploy.runtime.session`, documented there),
- :func:`open_engine_set`, :class:`EngineSet` (:mod:`hms_deploy.runtime.engines`),
- :class:`Policy`, :func:`parse_policy` (:mod:`hms_deploy.runtime.policy`),
- :class:`RunSettings`, :func:`resolve_options` (:mod:`hms_deploy.runtime.options`),
  :func:`run_batch` (:mod:`hms_deploy.runtime.scheduler`),
- :class:`ResultsFile` (:mod:`hms_deploy.runtime.results`),
- :func:`classify_ray`, :class:`RayLayout` (:mod:`hms_deploy.runtime.ray_batch`; needs
  the ``[ray]`` extra).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "EngineSet",
    "Policy",
    "RayLayout",
    "ResultsFile",
    "RunSettings",
    "Session",
    "classify_ray",
    "open_engine_set",
    "parse_policy",
    "resolve_options",
    "run_batch",
]

_WHERE = {
    "EngineSet": "engines",
    "open_engine_set": "engines",
    "Policy": "policy",
    "parse_policy": "policy",
    "ResultsFile": "results",
    "RunSettings": "options",
    "resolve_options": "options",
    "run_batch": "scheduler",
    "Session": "session",
    "classify_ray": "ray_batch",
    "RayLayout": "ray_batch",
}


def __getattr__(name: str) -> Any:
    """Lazy imports, so ``import hms_deploy.runtime.engine`` stays light."""
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"hms_deploy.runtime.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'hms_deploy.runtime' has no attribute {name!r}")

"""HMS counters on Triton's metrics port (Python-backend custom metrics).

:class:`ServeMetrics` counts every answer of the model ``hms``: requests by outcome,
videos, steps, backbone runs per modality, GMAC spent and GMAC a dense run would have
spent, seconds per stage; the figures are sums over the answered records (the names and
labels are listed in docs/serving.md). It is built on ``triton_python_backend_utils``
(``MetricFamily`` / ``Metric.increment``), which exists only inside the backend's stub:
:meth:`ServeMetrics.create` returns None where it is missing (an older Triton, a test
without Triton).
"""

from __future__ import annotations

from typing import Any

from hms_deploy.runtime.serve.handler import INTERNAL_PREFIX

OUTCOMES = ("ok", "bad", "error", "refused")
MODALITIES = ("audio", "appearance", "motion")
STAGES = ("total", "decode", "audio", "appearance", "motion", "cells_gates", "other")


def outcome(answer: list[dict[str, Any]] | str) -> str:
    """``ok`` (records), ``error`` (the server's fault) or ``bad`` (the request's)."""
    if not isinstance(answer, str):
        return "ok"
    return "error" if answer.startswith(INTERNAL_PREFIX) else "bad"


def totals(records: list[dict[str, Any]]) -> dict[str, float]:
    """What one answer's records add to the counters (keys as in :meth:`ServeMetrics.add`)."""
    out: dict[str, float] = {"videos": float(len(records))}
    for r in records:
        steps = float(r.get("steps") or 0)
        usage = r.get("usage") or {}
        gmac = r.get("gflops") or {}
        audio = (r.get("stats") or {}).get("audio_steps", steps)
        adds = {"steps": steps, "runs:audio": float(audio or 0),
                "runs:appearance": float(usage.get("appearance") or 0),
                "runs:motion": float(usage.get("motion") or 0),
                "gmac": float(gmac.get("used") or 0), "gmac_dense": float(gmac.get("dense") or 0)}
        for stage, ms in (r.get("timing_ms") or {}).items():
            adds[f"stage:{stage}"] = float(ms or 0) / 1e3
        for k, v in adds.items():
            out[k] = out.get(k, 0.0) + v
    return out


class ServeMetrics:
    """The model's metric families and their label sets, created once per stub."""

    def __init__(self, pb_utils: Any):
        counter = pb_utils.MetricFamily.COUNTER

        self.families: list[Any] = []  # a family must outlive its metrics (Triton's rule)

        def family(name: str, what: str) -> Any:
            f = pb_utils.MetricFamily(name=name, description=what, kind=counter)
            self.families.append(f)
            return f

        requests = family("hms_requests_total", "Requests answered by model hms, by outcome")
        runs = family("hms_backbone_runs_total", "Backbone runs by modality (audio = steps)")
        stages = family("hms_stage_seconds_total", "Seconds per stage (sum of records' timing_ms)")
        self.metrics: dict[str, Any] = {
            **{f"outcome:{o}": requests.Metric(labels={"outcome": o}) for o in OUTCOMES},
            **{f"runs:{m}": runs.Metric(labels={"modality": m}) for m in MODALITIES},
            **{f"stage:{s}": stages.Metric(labels={"stage": s}) for s in STAGES},
            "videos": family("hms_videos_total", "Videos classified").Metric(labels={}),
            "steps": family("hms_steps_total", "Steps run").Metric(labels={}),
            "gmac": family("hms_gmac_total", "GMAC spent").Metric(labels={}),
            "gmac_dense": family("hms_gmac_dense_total",
                                 "GMAC a dense run of the same videos would spend").Metric(labels={}),
        }

    @classmethod
    def create(cls, pb_utils: Any) -> ServeMetrics | None:
        if not hasattr(pb_utils, "MetricFamily"):
            return None
        return cls(pb_utils)

    def add(self, key: str, value: float) -> None:
        metric = self.metrics.get(key)
        if metric is not None and value > 0:
            try:
                metric.increment(value)
            except Exception:  # noqa: BLE001 - counting never fails a request
                self.metrics.pop(key, None)

    def count(self, answer: list[dict[str, Any]] | str) -> None:
        """Count one request's answer: its records' figures, or its error."""
        self.add(f"outcome:{outcome(answer)}", 1.0)
        if isinstance(answer, str):
            return
        for key, value in totals(answer).items():
            self.add(key, value)

    def refused(self, n: int) -> None:
        self.add("outcome:refused", float(n))

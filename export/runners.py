"""Runtime engines as Polygraphy runners, and the per-part comparison over them.

The export's parity check runs the engines that serve (:mod:`hms_deploy.runtime`
backends), never a private copy: :class:`EngineRunner` wraps one runtime
:class:`~hms_deploy.runtime.engine.Engine` as a ``polygraphy.backend.base.BaseRunner``,
so Polygraphy's ``Comparator.run`` drives the reference and candidate engines over the
same feed dicts (and users can point Polygraphy's own tooling at our engines).
:func:`compare_part` computes :mod:`hms_deploy.export.figures` on what it collected.

At the Polygraphy boundary feeds and outputs are numpy arrays (Polygraphy's own
currency: it guesses a torch dtype's library by trying its importers in turn, and the
``tensorrt-stubs`` namespace package that the type check installs breaks that guess);
the runner turns them into torch tensors on the engine's device and copies outputs back
to the host (an engine's outputs live only until its next call, see
:mod:`hms_deploy.runtime.engine`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator
from polygraphy.datatype import DataType
from polygraphy.logger import G_LOGGER

from hms_deploy.dtypes import NUMPY_DTYPES, TORCH_DTYPES
from hms_deploy.export.figures import Tolerance, compare
from hms_deploy.runtime.engine import Engine

Tensor = torch.Tensor
Feed = dict[str, Tensor]
# (part, inputs) -> outputs: one engine set called by part name (host tensors in and out)
Runner = Callable[[str, Feed], Feed]


def call_engine(engine: Engine, inputs: Feed) -> Feed:
    """``engine`` on host ``inputs`` (moved to its device); outputs copied to the host."""
    dev = engine.device
    out = engine({k: v.to(dev) for k, v in inputs.items()})
    return {k: v.detach().to("cpu", copy=True) for k, v in out.items()}


def engine_set_runner(engines: Any) -> Runner:
    """A :data:`Runner` over an :class:`~hms_deploy.runtime.engines.EngineSet` (opened)."""
    return lambda part, inputs: call_engine(engines[part], inputs)


class EngineRunner(BaseRunner):  # type: ignore[misc]
    """A runtime engine as a Polygraphy runner (``activate`` opens it unless already open)."""

    def __init__(self, engine: Engine, name: str):
        super().__init__(name=name, prefix="hms-engine")
        self.engine = engine
        self._opened_here = False
        self.inference_time: float | None = None

    def activate_impl(self) -> None:
        self._opened_here = not self.engine.is_open
        self.engine.__enter__()

    def get_input_metadata_impl(self) -> TensorMetadata:
        meta = TensorMetadata()
        for t in self.engine.spec.inputs:
            meta.add(t.name, dtype=DataType.from_dtype(NUMPY_DTYPES[TORCH_DTYPES[t.dtype]], "numpy"), shape=("N", *t.shape))
        return meta

    def infer_impl(
        self, feed_dict: dict[str, NDArray[np.generic]]
    ) -> OrderedDict[str, NDArray[np.generic]]:
        t0 = time.perf_counter()
        out = call_engine(self.engine, {k: torch.from_numpy(v) for k, v in feed_dict.items()})
        self.inference_time = time.perf_counter() - t0
        return OrderedDict((k, v.numpy()) for k, v in out.items())

    def deactivate_impl(self) -> None:
        if self._opened_here:
            self.engine.__exit__(None, None, None)
        self._opened_here = False


def split(inputs: Feed, chunk: int) -> list[Feed]:
    """``inputs`` as feed dicts of at most ``chunk`` rows (the batch axis is the first)."""
    n = next(iter(inputs.values())).shape[0]
    return [{k: v[i:i + chunk] for k, v in inputs.items()} for i in range(0, n, max(1, chunk))]


def run_engines(engines: dict[str, Engine], feeds: list[Feed]) -> dict[str, Feed]:
    """Polygraphy's ``Comparator.run`` of each named engine over ``feeds``; per name, the
    outputs of every feed concatenated along the batch axis."""
    runners = [EngineRunner(e, name) for name, e in engines.items()]
    loader = [{k: v.numpy() for k, v in f.items()} for f in feeds]
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        results = Comparator.run(runners, data_loader=loader)
    out: dict[str, Feed] = {}
    for name in engines:
        iters = results[name]
        out[name] = {k: torch.cat([torch.from_numpy(np.asarray(it[k])) for it in iters]) for k in iters[0]}
    return out


def compare_part(
    ref: Engine, cand: Engine, inputs: Feed, tol: Tolerance, *, chunk: int | None = None,
) -> tuple[dict[str, Any], Feed, Feed]:
    """Reference and candidate engines on ``inputs`` (in feeds of ``chunk`` rows);
    returns (figures per output, reference outputs, candidate outputs)."""
    feeds = split(inputs, chunk or 1 << 30)
    outs = run_engines({"reference": ref, "candidate": cand}, feeds)
    r, c = outs["reference"], outs["candidate"]
    return {name: compare(r[name], c[name], tol) for name in ref.output_names}, r, c

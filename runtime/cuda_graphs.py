"""CUDA graphs for small, launch-bound engines (cells, gates, head) with static I/O.

A graph replays the kernels of one launch with the addresses and shapes it was captured
with, so each batch size N gets its own graph over its own static input and output
tensors: a call copies its inputs into the static inputs (on the engine's stream) and
replays. Capture follows TRT_NOTES: shapes and addresses set once, one warm-up launch
and a sync, then ``torch.cuda.graph(g, stream=s, capture_error_mode="thread_local")``.
If capture fails the caller runs that N eagerly from then on.

Never wrap an ONNX Runtime session with its own CUDA graph (``enable_cuda_graph``) in
this capture: the process dies. These graphs are for TensorRT contexts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

# parts whose launches are a few tiny kernels: replaying a graph beats launching them
GRAPH_PARTS = frozenset(
    {"audio_cell", "appearance_cell", "motion_cell", "appearance_gate", "motion_gate", "head"}
)


@dataclass
class StaticGraph:
    """A captured launch: replay after copying new data into ``inputs``; read ``outputs``."""

    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    owner: object = None  # what the captured kernels use and must outlive them (a TRT context)

    def replay(self, inputs: Mapping[str, torch.Tensor], stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
        """Copy ``inputs`` into the static inputs and replay, both on ``stream``."""
        with torch.cuda.stream(stream):
            for name, x in inputs.items():
                self.inputs[name].copy_(x, non_blocking=True)
            self.graph.replay()
        return self.outputs


def capture(
    launch: Callable[[], None],
    stream: torch.cuda.Stream,
    inputs: dict[str, torch.Tensor],
    outputs: dict[str, torch.Tensor],
) -> StaticGraph | None:
    """Capture ``launch`` (which must read ``inputs`` and write ``outputs``) on ``stream``.

    ``launch`` is run once eagerly first (TensorRT does shape-dependent setup on the first
    launch after a shape change), then captured. Returns None if capture fails (an
    operation that cannot be captured); the caller then stays eager for this shape.
    """
    with torch.cuda.stream(stream):
        launch()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            launch()
    except RuntimeError:
        stream.synchronize()
        return None
    return StaticGraph(graph, inputs, outputs)

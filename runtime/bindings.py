"""Buffer and binding logic shared by the ONNX Runtime and TensorRT backends.

Everything here is plain torch, so it is unit-tested without TensorRT or a GPU:

- dtype look-ups over :mod:`hms_deploy.dtypes` (TensorRT ``DataType`` names, ONNX Runtime
  type strings, numpy) with errors naming the tensor (dtypes are read from the engine);
- :func:`bindable`: an input made safe to hand to an engine by pointer (right device,
  dtype, contiguous). A non-contiguous input is copied, and the copy is returned so the
  caller can hold it alive until the engine is done with it. **Never bind a temporary**:
  ``x.contiguous().data_ptr()`` on a non-contiguous ``x`` frees the copy while the
  engine still reads it;
- :class:`OutputBuffers`: output tensors allocated once per output shape (per part and
  batch size N) and reused by later calls, with a second set used when an input aliases
  the first (an LSTM cell fed its own previous ``h_next``).

Buffers reused across calls mean an engine's outputs stay valid until the next call of
the same engine with the same batch size (see :class:`hms_deploy.runtime.engine.Engine`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from hms_deploy.dtypes import NUMPY_DTYPES, ORT_TO_TORCH, TRT_TO_TORCH
from hms_deploy.errors import EngineError

from .engine import same_device


def torch_dtype_from_trt(name: str, *, where: str) -> torch.dtype:
    """A TensorRT ``DataType`` (its name, ``"INT64"`` or ``"DataType.INT64"``) -> torch dtype.

    ``where`` names the tensor for the error, e.g. ``"appearance_gate: output 'decision'"``.
    """
    key = name.rsplit(".", 1)[-1].upper()
    try:
        return TRT_TO_TORCH[key]
    except KeyError:
        raise EngineError(
            f"{where} has TensorRT dtype {key}, which this runtime cannot bind "
            f"(supported: {', '.join(TRT_TO_TORCH)})"
        ) from None


def torch_dtype_from_ort(type_str: str, *, where: str) -> torch.dtype:
    """An ONNX Runtime type string (``"tensor(float)"``) -> torch dtype."""
    try:
        return ORT_TO_TORCH[type_str]
    except KeyError:
        raise EngineError(f"{where} has ONNX type {type_str}, which this runtime cannot bind") from None


def numpy_dtype(dtype: torch.dtype, *, where: str) -> type[np.generic]:
    try:
        return NUMPY_DTYPES[dtype]
    except KeyError:
        raise EngineError(f"{where} has dtype {dtype}, which ONNX Runtime cannot bind from numpy") from None


def bindable(part: str, name: str, x: torch.Tensor, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a tensor an engine may read by pointer: on ``device``, of ``dtype``, contiguous.

    Wrong device raises :class:`EngineError` (binding a host pointer to a GPU engine
    reads garbage or crashes). A dtype the engine was built with differs from the part's
    spec dtype only for plans with other I/O precision: then ``x`` is cast. A
    non-contiguous ``x`` is copied. The result may be a new tensor: **hold it** until
    the engine is done with it (for CUDA: until the stream has passed the launch).
    """
    if not same_device(x.device, device):
        raise EngineError(f"{part}: input '{name}' is on {x.device}, expected {device}")
    if x.dtype != dtype:
        x = x.to(dtype)
    if not x.is_contiguous():
        x = x.contiguous()
    return x


def new_stream(device: torch.device) -> torch.cuda.Stream:
    """A new non-default CUDA stream on ``device`` (the one stream an engine set runs on)."""
    return torch.cuda.Stream(device)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range [start, end) of the memory ``t`` can reach (its whole storage)."""
    s = t.untyped_storage()
    start = s.data_ptr()
    return start, start + s.nbytes()


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' storages share memory (same device)."""
    if a.device != b.device:
        return False
    a0, a1 = _span(a)
    b0, b1 = _span(b)
    return a0 < b1 and b0 < a1


class OutputBuffers:
    """Output tensors of one part, allocated once per output-shape set and reused.

    ``get(shapes, avoid=inputs)`` returns a dict of tensors with those shapes. Calls
    with the same shapes (the same batch size N) get the same tensors back, unless one
    of them shares memory with a tensor in ``avoid``: then another set is used (and
    allocated once), so an engine never writes into an input it is reading. At most
    ``max_shapes`` shape sets are kept (least recently used dropped); tensors a caller
    still references stay alive through that reference.
    """

    def __init__(
        self, part: str, dtypes: Mapping[str, torch.dtype], device: torch.device, *, max_shapes: int = 64
    ):
        self.part = part
        self.dtypes = dict(dtypes)
        self.device = device
        self.max_shapes = max_shapes
        # shapes -> [(buffers, their byte spans)]
        self._sets: OrderedDict[
            tuple[tuple[int, ...], ...], list[tuple[dict[str, torch.Tensor], list[tuple[int, int]]]]
        ] = OrderedDict()
        self.allocations = 0  # buffer sets allocated so far (for tests and benchmarks)

    def __len__(self) -> int:
        """Buffer sets currently held."""
        return sum(len(v) for v in self._sets.values())

    def clear(self) -> None:
        self._sets.clear()

    def get(
        self, shapes: Mapping[str, tuple[int, ...]], *, avoid: Iterable[torch.Tensor] = ()
    ) -> dict[str, torch.Tensor]:
        try:
            key = tuple(tuple(shapes[name]) for name in self.dtypes)
        except KeyError:
            key = ()
        sets = self._sets.get(key)
        if sets is None:
            if set(shapes) != set(self.dtypes):
                raise EngineError(
                    f"{self.part}: output shapes given for {sorted(shapes)}, expected {sorted(self.dtypes)}"
                )
            for name, shape in zip(self.dtypes, key):
                if any(int(d) < 0 for d in shape):
                    raise EngineError(f"{self.part}: output '{name}' has unresolved shape {shape}")
            sets = self._sets[key] = []
            while len(self._sets) > self.max_shapes:
                self._sets.popitem(last=False)
        elif len(self._sets) > 1:
            self._sets.move_to_end(key)
        spans = [_span(a) for a in avoid if a.device.type == self.device.type]
        for bufs, own in sets:
            if not any(a0 < b1 and b0 < a1 for b0, b1 in own for a0, a1 in spans):
                return bufs
        self.allocations += 1
        bufs = {
            name: torch.empty(shape, dtype=dtype, device=self.device)
            for (name, dtype), shape in zip(self.dtypes.items(), key)
        }
        sets.append((bufs, [_span(b) for b in bufs.values()]))
        return bufs

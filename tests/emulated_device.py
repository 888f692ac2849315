"""The emulated CUDA device of the TensorRT emulator (tests/trt_emulator.py): streams whose
launches stay pending until a flush, stream order while a stream is current, poisoned
memory and lifetime checks over CPU memory. A test double: never shipped.

It implements :class:`~hms_deploy.runtime.streams.DeviceStreams`, so the real TensorRT
backend runs its ordering and lifetime rules against it; see trt_emulator's docstring.
"""

from __future__ import annotations

import ctypes
import itertools
import sys
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from emulated_engine import IExecutionContext

POISON = 0xFF
GPU_NAME = "TensorRT emulator (CPU)"
GPU_CC = (9, 0)


class EmulatorError(AssertionError):
    """A use of TensorRT or of device memory that would be undefined behaviour on a GPU."""


def _tensor_at(ptr: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The CPU memory at ``ptr`` as a tensor (what TensorRT does with a bound address)."""
    n = int(np.prod(shape)) if shape else 1
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=dtype).view(shape)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()


def _span(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.data_ptr() + s.nbytes()


# ----------------------------------------------------------------------------- the device


class EmuStream:
    """An emulated CUDA stream: launches wait in ``pending`` until a flush."""

    def __init__(self, device: EmulatedDevice, handle: int):
        self.device = device
        self.cuda_stream = handle
        self.pending: list[_Launch] = []
        self.kept: list[torch.Tensor] = []  # recorded since the last flush (kept alive)
        self.recorded: list[weakref.ref[torch.Tensor]] = []  # recorded earlier (alive or not)

    def __repr__(self) -> str:
        return f"EmuStream({self.cuda_stream:#x}, {len(self.pending)} pending)"

    def synchronize(self) -> None:
        self.flush()

    def _alive_spans(self) -> list[tuple[int, int]]:
        self.recorded = [r for r in self.recorded if r() is not None]
        return [_span(t) for t in self.kept] + [_span(t) for r in self.recorded if (t := r()) is not None]

    def flush(self, alive: list[tuple[int, int]] = ()) -> None:  # type: ignore[assignment]
        """Run every pending launch in order, then release what was kept for them.
        ``alive``: memory known to be alive now (the tensors of the op that waits)."""
        pending, self.pending = self.pending, []
        if pending:
            spans = self._alive_spans() + list(alive)
            for launch in pending:
                launch.run(spans)
                self.device.launches += 1
        kept, self.kept = self.kept, []
        while kept:
            t = kept.pop()
            self.recorded.append(weakref.ref(t))
            # only the emulator referenced it: the allocator would now hand it out again
            if sys.getrefcount(t) <= 2 and torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2:
                ctypes.memset(t.untyped_storage().data_ptr(), POISON, t.untyped_storage().nbytes())
                self.device.poisoned += 1
            del t


class EmulatedDevice:
    """:class:`~hms_deploy.runtime.streams.DeviceStreams` over CPU memory (see the module doc)."""

    cuda = False

    def __init__(self) -> None:
        self._handles = itertools.count(0x1000)
        self.streams: dict[int, EmuStream] = {}
        self.launches = 0  # launches executed (for tests)
        self.poisoned = 0  # tensors poisoned when the emulator dropped the last reference
        self.waits = 0  # stream waits that ordered an engine stream's work (for tests)
        # the caller's "current stream": eager CPU torch, which never waits; not launchable
        self.host = EmuStream(self, 0)
        self.current = self.host

    def new_stream(self, device: torch.device) -> EmuStream:
        s = EmuStream(self, next(self._handles))
        self.streams[s.cuda_stream] = s
        return s

    def current_stream(self, device: torch.device) -> EmuStream:
        """The stream made current by :meth:`use` (the scheduler's), else the host's work."""
        return self.current

    @contextmanager
    def use(self, stream: Any) -> Iterator[None]:
        """Make ``stream`` current (``torch.cuda.stream(s)``): the engines' launches then stay
        pending, and eager torch work on the host is ordered after them the way a GPU orders
        work on one stream: a torch op that touches memory a pending launch reads or writes
        runs those launches first (:class:`_StreamOrder`)."""
        if not isinstance(stream, EmuStream):
            raise EmulatorError(f"use() of {stream!r}, which is not an emulated stream")
        previous, self.current = self.current, stream
        try:
            with _StreamOrder(stream):
                yield
        finally:
            self.current = previous

    def wait(self, waiter: Any, waited: Any) -> None:
        if isinstance(waited, EmuStream) and waited is not self.host:
            self.waits += 1
            waited.flush()

    def record(self, tensors: Any, stream: Any) -> None:
        if not isinstance(stream, EmuStream):
            raise EmulatorError(f"record on {stream!r}, which is not an emulated stream")
        stream.kept.extend(tensors)

    def guard(self, device: torch.device) -> AbstractContextManager[Any]:
        return nullcontext()

    def gpu(self, device: torch.device) -> tuple[tuple[int, int], str]:
        return GPU_CC, GPU_NAME

    def synchronize(self) -> None:
        for s in list(self.streams.values()):
            s.flush()

    def pending(self) -> int:
        return sum(len(s.pending) for s in self.streams.values())


def peek(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t``'s memory as it is now, without waiting for any stream (what a host
    read that skips the synchronisation would see)."""
    with torch._C.DisableTorchFunction():
        return _tensor_at(t.data_ptr(), tuple(t.shape), t.dtype).clone()


class _StreamOrder(torch.overrides.TorchFunctionMode):
    """While a stream is current: a torch op whose tensors overlap the memory of a launch
    pending on it first runs the stream's pending launches (stream order)."""

    def __init__(self, stream: EmuStream):
        super().__init__()
        self.stream = stream

    # what reads no element (metadata, pointers, properties): never waits
    METADATA = frozenset({"__get__", "data_ptr", "is_contiguous", "untyped_storage", "numel", "size",
                          "dim", "stride", "element_size", "storage_offset", "__len__", "is_pinned",
                          "get_device", "nbytes"})

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.stream.pending and getattr(func, "__name__", "") not in self.METADATA:
            used = self._spans((*args, *kwargs.values()))
            pending = [(ptr, ptr + _nbytes(launch.shapes[name], launch.engine.dtype(name)))
                       for launch in self.stream.pending for name, ptr in launch.addresses.items()]
            if any(a < y and x < b for a, b in used for x, y in pending):
                # the op's own tensors are alive (the caching allocator reuses memory in
                # stream order, so on one stream nothing else needs recording)
                self.stream.flush(alive=used)
        return func(*args, **kwargs)

    @staticmethod
    def _spans(values: Any) -> list[tuple[int, int]]:
        out, stack = [], list(values)
        while stack:
            v = stack.pop()
            if isinstance(v, torch.Tensor):
                if v.device.type == "cpu" and v.untyped_storage().nbytes() > 0:
                    out.append(_span(v))
            elif isinstance(v, (list, tuple)):
                stack.extend(v)
            elif isinstance(v, dict):
                stack.extend(v.values())
        return out


class _Launch:
    def __init__(self, context: IExecutionContext, shapes: dict[str, tuple[int, ...]],
                 addresses: dict[str, int]):
        self.context = weakref.ref(context)
        self.engine = context.engine
        self.shapes = shapes
        self.addresses = addresses

    def run(self, spans: list[tuple[int, int]]) -> None:
        engine = self.engine
        if self.context() is None:
            raise EmulatorError(f"{engine.part}: execution context destroyed while its launch was pending")
        for name, ptr in self.addresses.items():
            end = ptr + _nbytes(self.shapes[name], engine.dtype(name))
            if not any(a <= ptr and end <= b for a, b in spans):
                raise EmulatorError(
                    f"{engine.part}: launch uses '{name}' at {ptr:#x}, which no live tensor recorded "
                    f"on its stream covers (freed before completion, or never recorded)"
                )
        feeds = {
            name: _tensor_at(self.addresses[name], self.shapes[name], engine.dtype(name)).numpy().copy()
            for name in engine.input_names
        }
        outs = engine.session().run(engine.output_names, feeds)
        for name, y in zip(engine.output_names, outs):
            dst = _tensor_at(self.addresses[name], self.shapes[name], engine.dtype(name))
            dst.copy_(torch.from_numpy(np.ascontiguousarray(y)).to(dst.dtype))

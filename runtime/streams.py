"""How an engine orders its work on a device: CUDA streams, or a stand-in with the same rules.

The TensorRT backend launches on one caller-owned, non-default stream. What it needs
from the device besides TensorRT itself is this protocol (:class:`DeviceStreams`):
make a stream, find the caller's current one, make one current, make one stream wait
for another (without the host waiting), tell the allocator which stream uses a tensor (so its
memory is not reused before the stream is past that use), a device guard, and the
GPU's name and compute capability. :data:`CUDA` implements it with ``torch.cuda``.

The tests' TensorRT emulator (``tests/trt_emulator.py``) implements the same protocol
over CPU memory with deferred execution, so the backend's ordering and lifetime rules
are exercised on machines without a GPU; it is not a backend users can select.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

from .bindings import new_stream


class Stream(Protocol):
    """A stream handle an engine launches on (``torch.cuda.Stream`` on CUDA)."""

    @property
    def cuda_stream(self) -> int: ...

    def synchronize(self) -> None: ...


class DeviceStreams(Protocol):
    """The ordering and lifetime operations an engine needs (see the module docstring)."""

    @property
    def cuda(self) -> bool:
        """True for a real CUDA device (TensorRT then requires one)."""
        ...

    def new_stream(self, device: torch.device) -> Stream: ...

    def current_stream(self, device: torch.device) -> Stream | None:
        """The caller's current stream; None where host code is the only other actor."""
        ...

    def use(self, stream: Stream) -> AbstractContextManager[Any]:
        """Make ``stream`` the current one while the block runs (the scheduler runs its
        whole step loop on the engines' stream, so engines launch without waits)."""
        ...

    def wait(self, waiter: Stream, waited: Stream) -> None:
        """Work issued later on ``waiter`` runs after the work issued so far on ``waited``."""
        ...

    def record(self, tensors: Iterable[torch.Tensor], stream: Stream) -> None:
        """``stream`` uses these tensors: their memory outlives its work issued so far."""
        ...

    def guard(self, device: torch.device) -> AbstractContextManager[Any]: ...

    def gpu(self, device: torch.device) -> tuple[tuple[int, int], str]:
        """(compute capability, name) of the device plans are built for."""
        ...


class CudaStreams:
    """:class:`DeviceStreams` with ``torch.cuda``; on a CPU device every operation is a no-op."""

    cuda = True

    def new_stream(self, device: torch.device) -> Stream:
        stream: Stream = new_stream(device)
        return stream

    def current_stream(self, device: torch.device) -> Stream | None:
        if device.type != "cuda":
            return None
        stream: Stream = torch.cuda.current_stream(device)
        return stream

    def use(self, stream: Stream) -> AbstractContextManager[Any]:
        return torch.cuda.stream(stream) if isinstance(stream, torch.cuda.Stream) else contextlib.nullcontext()

    def wait(self, waiter: Stream, waited: Stream) -> None:
        if isinstance(waiter, torch.cuda.Stream) and isinstance(waited, torch.cuda.Stream):
            waiter.wait_stream(waited)

    def record(self, tensors: Iterable[torch.Tensor], stream: Stream) -> None:
        if isinstance(stream, torch.cuda.Stream):
            for x in tensors:
                if x.is_cuda:
                    x.record_stream(stream)

    def guard(self, device: torch.device) -> AbstractContextManager[Any]:
        return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    def gpu(self, device: torch.device) -> tuple[tuple[int, int], str]:
        major, minor = torch.cuda.get_device_capability(device)
        return (int(major), int(minor)), torch.cuda.get_device_name(device)


CUDA: DeviceStreams = CudaStreams()


@contextlib.contextmanager
def ordered(streams: DeviceStreams, stream: Stream, device: torch.device) -> Iterator[Stream]:
    """Run the block's launches on ``stream``, ordered after the caller's current stream
    (inputs written there come first) and the caller's stream after them (readers there
    see finished outputs); nothing to order where the caller already is on ``stream``."""
    caller = streams.current_stream(device)
    if caller is None or caller == stream:
        yield stream
        return
    streams.wait(stream, caller)
    try:
        yield stream
    finally:
        streams.wait(caller, stream)

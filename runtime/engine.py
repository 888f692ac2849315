"""The engine contract every backend implements (one file per backend in ``backends/``).

An :class:`Engine` runs one HMS part: it takes a dict of named torch tensors and returns a
dict of named torch tensors, in the order the part's spec (and the manifest) gives.
Construction is cheap; resources (sessions, plans, CUDA buffers) are acquired in
``__enter__`` and freed in ``__exit__``. Every engine counts its calls, so tests and
benchmarks can prove that a skipped modality launched nothing.

Output lifetime (the same rule on every backend): an engine's outputs are valid until
the next call of the same engine with the same batch size N. The GPU backends write
into output buffers allocated once per (part, N) and reused; keep a result longer by
cloning or copying it into your own state. An engine never writes into one of its own
inputs: feeding a cell its previous ``h_next`` is safe (a second buffer set is used).
On CUDA, engines run on one caller-owned non-default stream; outputs are ordered before
later work on the caller's current stream, so reading them needs no extra sync.

Input checking and output shapes are shared code (here), exercised by every backend,
so the TensorRT backend only adds TensorRT calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch

from hms_deploy.dtypes import TORCH_DTYPES
from hms_deploy.errors import EngineError
from hms_deploy.parts import PartSpec

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

Tensor = torch.Tensor



def check_inputs(spec: PartSpec, inputs: dict[str, Tensor]) -> int:
    """Validate named inputs against a part spec; return the batch size N.

    Raises :class:`EngineError` naming the part, the input, what was received and what
    was expected, e.g. ``motion_cell: input 'h' has shape (1, 1024), expected (N, 2048)``.
    """
    names = spec.input_names
    if set(inputs) != set(names):
        missing = [n for n in names if n not in inputs]
        extra = [n for n in inputs if n not in names]
        raise EngineError(
            f"{spec.name}: inputs {sorted(inputs)} do not match the part's inputs {names}"
            f" (missing {missing}, unexpected {extra})"
        )
    n: int | None = None
    for t in spec.inputs:
        x = inputs[t.name]
        if not isinstance(x, torch.Tensor):
            raise EngineError(f"{spec.name}: input '{t.name}' is a {type(x).__name__}, expected a torch.Tensor")
        want = TORCH_DTYPES[t.dtype]
        if x.dtype != want:
            raise EngineError(f"{spec.name}: input '{t.name}' has dtype {x.dtype}, expected {want}")
        if x.ndim != len(t.shape) + 1 or tuple(x.shape[1:]) != t.shape:
            raise EngineError(
                f"{spec.name}: input '{t.name}' has shape {tuple(x.shape)}, expected {t.describe()}"
            )
        if n is None:
            n = x.shape[0]
        elif x.shape[0] != n:
            raise EngineError(
                f"{spec.name}: input '{t.name}' has batch {x.shape[0]}, but '{spec.inputs[0].name}' has {n}"
            )
    if not n:
        raise EngineError(f"{spec.name}: empty batch (N = 0)")
    return n


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:<current>`` are the same device; ``cpu`` is ``cpu``."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    cur = torch.cuda.current_device()
    return (cur if a.index is None else a.index) == (cur if b.index is None else b.index)


def check_devices(spec: PartSpec, inputs: dict[str, Tensor], device: torch.device) -> None:
    """Every input on ``device``, else :class:`EngineError` naming the part and the input."""
    for name in spec.input_names:
        x = inputs[name]
        if x.device != device and not same_device(x.device, device):
            raise EngineError(f"{spec.name}: input '{name}' is on {x.device}, expected {device}")


def output_shapes(spec: PartSpec, n: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the part's outputs at batch ``n`` (for preallocating output buffers)."""
    return {t.name: t.with_batch(n) for t in spec.outputs}


class Engine(ABC):
    """One part, one backend. ``engine(inputs) -> outputs`` with named torch tensors."""

    backend: str = "abstract"
    spec: PartSpec
    device: torch.device
    calls: int

    def __init__(self, spec: PartSpec, device: torch.device):
        self.spec = spec
        self.device = device
        self.calls = 0
        self._open = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def is_open(self) -> bool:
        """Whether the engine's resources are acquired (inside its ``with`` block)."""
        return self._open

    @property
    def input_names(self) -> list[str]:
        return self.spec.input_names

    @property
    def output_names(self) -> list[str]:
        return self.spec.output_names

    def __enter__(self) -> Self:
        if not self._open:
            self.open()
            self._open = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._open:
            self.close()
            self._open = False

    def __call__(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        if not self._open:
            raise EngineError(f"{self.name}: engine used outside its 'with' block")
        n = check_inputs(self.spec, inputs)
        check_devices(self.spec, inputs, self.device)
        self.calls += 1
        out = self.run(inputs, n)
        return {k: out[k] for k in self.output_names}

    @abstractmethod
    def open(self) -> None:
        """Acquire resources (session, plan, buffers)."""

    @abstractmethod
    def close(self) -> None:
        """Free resources."""

    @abstractmethod
    def run(self, inputs: dict[str, Tensor], n: int) -> dict[str, Tensor]:
        """Run on validated inputs (batch ``n``); tensors on ``self.device``."""

    def describe(self) -> dict[str, Any]:
        return {"part": self.name, "backend": self.backend, "device": str(self.device), "calls": self.calls}

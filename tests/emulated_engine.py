"""The run side of the TensorRT emulator (tests/trt_emulator.py): a deserialised plan
(``ICudaEngine``: I/O by name, profile shapes; it executes the plan's ONNX model with ONNX
Runtime on the CPU) and its execution context (shapes refused outside the profile,
addresses, ``execute_async_v3`` enqueuing a launch on an emulated stream, outputs poisoned
until the launch runs). A test double: never shipped.
"""

from __future__ import annotations

import ctypes
import types
import weakref
from typing import Any

import torch
from emulated_device import POISON, EmulatorError, _Launch, _nbytes

_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
          "INT8": torch.int8, "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool,
          "UINT8": torch.uint8}


class Dims(tuple):
    pass


class ICudaEngine:
    def __init__(self, trt: types.ModuleType, header: dict[str, Any], onnx_bytes: bytes):
        self._trt = trt
        self.part = header.get("name", "?")
        self.io = header["io"]
        self.profile = {k: [tuple(s) for s in v] for k, v in header["profile"].items()}
        self.input_names = [t["name"] for t in self.io if t["mode"] == "INPUT"]
        self.output_names = [t["name"] for t in self.io if t["mode"] == "OUTPUT"]
        self._by_name = {t["name"]: t for t in self.io}
        self._onnx = onnx_bytes
        self._session: Any = None
        self.contexts: list[weakref.ref[IExecutionContext]] = []

    def session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            self._session = ort.InferenceSession(self._onnx, opts, providers=["CPUExecutionProvider"])
        return self._session

    def dtype(self, name: str) -> torch.dtype:
        return _TORCH[self._by_name[name]["dtype"]]

    @property
    def num_io_tensors(self) -> int:
        return len(self.io)

    def get_tensor_name(self, i: int) -> str:
        return str(self.io[i]["name"])

    def get_tensor_mode(self, name: str) -> Any:
        return self._trt.TensorIOMode[self._by_name[name]["mode"]]

    def get_tensor_dtype(self, name: str) -> Any:
        return self._trt.DataType[self._by_name[name]["dtype"]]

    def get_tensor_shape(self, name: str) -> Dims:
        return Dims(self._by_name[name]["shape"])

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[Dims]:
        if profile_index != 0 or name not in self.profile:
            raise EmulatorError(f"{self.part}: no profile {profile_index} for '{name}'")
        return [Dims(s) for s in self.profile[name]]

    def create_execution_context(self) -> IExecutionContext:
        ctx: IExecutionContext = self._trt.IExecutionContext(self)
        self.contexts.append(weakref.ref(ctx))
        return ctx


class IExecutionContext:
    def __init__(self, engine: ICudaEngine):
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.log: list[tuple[str, object]] = []

    def set_input_shape(self, name: str, shape: Any) -> bool:
        shape = tuple(int(d) for d in shape)
        self.log.append(("shape", (name, shape)))
        if name not in self.engine.profile:
            return False  # TensorRT logs "not an input" and refuses
        lo, _, hi = self.engine.profile[name]
        if len(shape) != len(lo) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = shape
        return True

    def _batch(self) -> int | None:
        if set(self.shapes) != set(self.engine.input_names):
            return None
        return {s[0] for s in self.shapes.values()}.pop()

    def get_tensor_shape(self, name: str) -> Dims:
        if name in self.shapes:
            return Dims(self.shapes[name])
        shape = list(self.engine.get_tensor_shape(name))
        n = self._batch()
        if n is not None and shape and shape[0] == -1:
            shape[0] = n
        return Dims(shape)

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.log.append(("address", name))
        if name not in self.engine._by_name or not ptr:
            return False
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.log.append(("launch", stream_handle))
        device = self.engine._trt.emulated_device
        stream = device.streams.get(int(stream_handle))
        if stream is None:
            raise EmulatorError(f"{self.engine.part}: execute_async_v3 on unknown stream {stream_handle:#x}"
                                " (0 is the legacy default stream, which adds device syncs)")
        if self._batch() is None:
            return False  # TensorRT logs "not all input shapes specified" and fails
        missing = [n for n in (*self.engine.input_names, *self.engine.output_names) if n not in self.addresses]
        if missing:
            return False
        shapes = {n: tuple(self.get_tensor_shape(n)) for n in (*self.engine.input_names, *self.engine.output_names)}
        launch = _Launch(self, shapes, dict(self.addresses))
        for name in self.engine.output_names:  # undefined until the stream is past the launch
            ctypes.memset(self.addresses[name], POISON, _nbytes(shapes[name], self.engine.dtype(name)))
        stream.pending.append(launch)
        return True

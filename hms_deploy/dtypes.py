"""The one dtype table: part-spec dtype names and every backend's names for them.

A :class:`~hms_deploy.parts.TensorSpec` names its dtype with a string (``"float32"``,
``"uint8"``, ``"int64"``, ...); the manifest stores the same string. Each backend reads
its own engine's dtypes (never assumes them) and maps them to torch with the tables
here: TensorRT ``DataType`` member names, ONNX Runtime type strings, ONNX
``TensorProto`` element types, and numpy for ONNX Runtime's IOBinding.
"""

from __future__ import annotations

import numpy as np
import torch

# part-spec / manifest dtype name -> torch
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}

# ONNX TensorProto element types of the spec dtypes
ONNX_ELEM_TYPES: dict[str, int] = {
    "float32": 1, "uint8": 2, "int8": 3, "int32": 6, "int64": 7, "bool": 9, "float16": 10,
    "bfloat16": 16,
}

# TensorRT ``DataType`` member name -> torch
TRT_TO_TORCH: dict[str, torch.dtype] = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "FP8": torch.float8_e4m3fn,
}

# ONNX Runtime ``NodeArg.type`` strings -> torch
ORT_TO_TORCH: dict[str, torch.dtype] = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(bfloat16)": torch.bfloat16,
    "tensor(double)": torch.float64,
    "tensor(int8)": torch.int8,
    "tensor(uint8)": torch.uint8,
    "tensor(int32)": torch.int32,
    "tensor(int64)": torch.int64,
    "tensor(bool)": torch.bool,
}

# torch -> numpy (ONNX Runtime's IOBinding takes a numpy dtype for the element type)
NUMPY_DTYPES: dict[torch.dtype, type[np.generic]] = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.bool: np.bool_,
}

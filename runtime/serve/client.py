"""What a tritonclient caller sends to the ``hms`` model: one request's inputs.

``request_inputs(tritonclient.http, path="clip.mp4", policy="learned")`` gives the
``InferInput`` list of one row: ``str``/``bytes`` values as ``BYTES``, ``float`` values as
``FP64`` (docs/serving.md lists the model's inputs). Works with the HTTP and the gRPC
client modules alike; numpy is the only import.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def request_inputs(module: Any, **values: Any) -> list[Any]:
    """``module.InferInput`` objects of one request row (``module``: tritonclient.http or
    tritonclient.grpc): str/bytes -> BYTES, float -> FP64."""
    out = []
    for name, value in values.items():
        if isinstance(value, float):
            arr, dtype = np.array([[value]], dtype=np.float64), "FP64"
        else:
            arr = np.array([[value.encode() if isinstance(value, str) else value]], dtype=object)
            dtype = "BYTES"
        item = module.InferInput(name, list(arr.shape), dtype)
        item.set_data_from_numpy(arr)
        out.append(item)
    return out

"""Make the installed ``tensorrt-stubs`` usable by mypy, in a folder for ``MYPYPATH``.

``tensorrt-stubs`` 10.13 installs ``tensorrt/__init__.pyi`` and ``tensorrt_bindings/*.pyi``
without a ``py.typed`` marker, so mypy skips them (``ignore_missing_imports`` then makes
every TensorRT name ``Any`` and nothing is checked). Pointed at directly they do not
parse: parameters named ``in``, a parameter without default after defaults, a module
variable ``bool`` that shadows the builtin, an import of ``tensorrt_libs``. This writes a
patched copy (each file marked ``# mypy: ignore-errors`` so the stubs' own remaining
flaws are not reported; the types they declare are still used)::

    .venv/bin/python tests/trt_stubs.py build/trt-stubs
    MYPYPATH=build/trt-stubs .venv/bin/mypy runtime/backends/trt.py runtime/bindings.py runtime/engine.py
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

FILES = ("tensorrt/__init__.pyi", "tensorrt_bindings/__init__.pyi", "tensorrt_bindings/tensorrt.pyi")


def _site_root() -> Path | None:
    spec = importlib.util.find_spec("tensorrt_stubs")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent.parent


def _patch(text: str) -> str:
    text = re.sub(r"^import tensorrt_libs.*$", "", text, flags=re.MULTILINE)
    text = re.sub(r"^from tensorrt_bindings(\.tensorrt)? import bool$", "", text, flags=re.MULTILINE)
    text = re.sub(r"^bool: DataType.*$", "", text, flags=re.MULTILINE)
    text = text.replace("'bool', ", "")
    text = re.sub(r"([(,] ?)in: ", r"\1in_: ", text)
    text = text.replace(
        "power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = ...)"
    )
    text = text.replace("from __future__ import annotations", "from __future__ import annotations\n"
                        "from typing import Any as capsule", 1)
    return "# mypy: ignore-errors\n" + text


def write_stubs(out: Path) -> Path | None:
    """Write the patched stubs under ``out``; None if tensorrt-stubs is not installed."""
    root = _site_root()
    if root is None or not all((root / f).is_file() for f in FILES):
        return None
    for f in FILES:
        dst = out / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(_patch((root / f).read_text()))
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "build/trt-stubs")
    if write_stubs(target) is None:
        sys.exit("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)")
    print(target)

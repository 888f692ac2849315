"""Export one part to ONNX, convert it to fp16, and check the graph.

Every part is exported on the CPU in fp32 with torch's legacy TorchScript exporter
(``torch.onnx.export(dynamo=False)``: it exports faster than the dynamo one, and the
graphs run at the same speed);
if that fails for a part, the dynamo exporter is tried and the manifest records which
one produced the file. Inputs and outputs carry the names of :mod:`hms_deploy.parts`,
every one has the symbolic batch axis ``"N"`` first (the example batch is 2, so no size
is specialised to 1), and graphs with control flow (If/Loop/Scan) are refused: TensorRT
and CUDA graphs want straight-line graphs.

``fp16``: the fp32 graph is converted with ONNX Runtime's float16 converter (the code of
onnxconverter-common, shipped inside ``onnxruntime.transformers``) with
``keep_io_types=True``, so inputs and outputs keep their fp32/uint8/int64 types and the
casts live inside the graph. TensorRT 11 networks are strongly typed: fp16 must be in
the ONNX, which this provides.

Parts whose weights exceed ~1.5 GB are stored with one external data file
``<part>.onnx.data`` next to ``<part>.onnx`` (files kind ``onnx_data`` in the manifest).
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hms_deploy.dtypes import ONNX_ELEM_TYPES
from hms_deploy.errors import ConfigError, ExportError, first_line
from hms_deploy.export.modules import ExportPart
from hms_deploy.outputs import disk_full
from hms_deploy.parts import PartSpec, random_inputs

DEFAULT_OPSET = 17
MIN_OPSET, MAX_OPSET = 17, 20
FORBIDDEN_OPS = frozenset({"If", "Loop", "Scan"})
EXPORT_BATCH = 2  # example batch: >= 2 so that no exporter specialises N to 1
EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf's hard limit is 2 GiB
PRECISIONS = ("fp32", "fp16")
BATCH_DIM = "N"


@dataclass
class OnnxPart:
    """What exporting one part produced. ``files``: kind -> file name inside the export dir."""

    name: str
    files: dict[str, str]
    opset: int
    exporter: str
    precision: str
    nodes: int
    ops: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _external_locations(model: Any) -> set[str]:
    from onnx.external_data_helper import uses_external_data

    locs: set[str] = set()
    for init in model.graph.initializer:
        if uses_external_data(init):
            locs.update(e.value for e in init.external_data if e.key == "location")
    return locs


def _store(path: Path, *, external: bool) -> dict[str, str]:
    """Re-save ``path`` as one .onnx (+ one ``.onnx.data`` if ``external``); returns files."""
    import onnx

    head = onnx.load(str(path), load_external_data=False)
    old = _external_locations(head)
    data_name = f"{path.name}.data"
    if not external and not old:
        return {"onnx": path.name}
    model = onnx.load(str(path))  # with its external data, if any
    for loc in old:
        (path.parent / loc).unlink(missing_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        return {"onnx": path.name, "onnx_data": data_name}
    onnx.save_model(model, str(path))
    return {"onnx": path.name}


def _torch_export(part: ExportPart, path: Path, opset: int, dynamo: bool) -> None:
    spec = part.spec
    example = random_inputs(spec, EXPORT_BATCH, seed=1)
    args = tuple(example[t.name] for t in spec.inputs)
    dynamic_axes = {name: {0: BATCH_DIM} for name in spec.input_names + spec.output_names}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(
                part.module, args, str(path), input_names=spec.input_names,
                output_names=spec.output_names, dynamic_axes=dynamic_axes,
                opset_version=max(opset, 18), dynamo=True, external_data=True,
            )
        else:
            torch.onnx.export(
                part.module, args, str(path), input_names=spec.input_names,
                output_names=spec.output_names, dynamic_axes=dynamic_axes,
                opset_version=opset, dynamo=False, do_constant_folding=True,
            )


def check_onnx_settings(opset: int, precision: str) -> None:
    """The one check of the ONNX settings (a :class:`ConfigError` naming the setting)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}",
                          setting="precision", value=precision, expected=" or ".join(PRECISIONS))
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"opset must be in {MIN_OPSET}..{MAX_OPSET}, got {opset}", setting="opset",
                          value=opset, expected=f"{MIN_OPSET}..{MAX_OPSET}")


def export_part(
    part: ExportPart,
    out_dir: Path,
    *,
    opset: int = DEFAULT_OPSET,
    precision: str = "fp32",
    external_data: bool | None = None,
) -> OnnxPart:
    """Export ``part`` to ``out_dir/<name>.onnx`` (fp32 or fp16) and check it.

    ``external_data``: ``None`` stores weights externally only when they exceed
    :data:`EXTERNAL_DATA_BYTES`. Raises :class:`ExportError` naming the part when both
    exporters fail or the graph does not pass :func:`check_onnx`.
    """
    check_onnx_settings(opset, precision)
    t0 = time.perf_counter()
    path = Path(out_dir) / f"{part.name}.onnx"
    exporter = "torch.onnx legacy (dynamo=False)"
    try:
        _torch_export(part, path, opset, dynamo=False)
    except Exception as legacy_error:  # any exporter failure: try the other one
        if (full := disk_full(legacy_error)) is not None:
            # a full disk: the other exporter would fail the same way; name the file
            raise OSError(full.errno, full.strerror, full.filename or str(path)) from legacy_error
        exporter = "torch.onnx dynamo"
        try:
            _torch_export(part, path, opset, dynamo=True)
        except Exception as e:
            raise ExportError(
                f"{part.name}: ONNX export failed (legacy exporter: {first_line(legacy_error, typed=True)}; "
                f"dynamo exporter: {first_line(e, typed=True)})"
            ) from e
    if precision == "fp16":
        convert_to_fp16(path)
    big = _param_bytes(part.module) > EXTERNAL_DATA_BYTES
    files = _store(path, external=big if external_data is None else external_data)
    info = check_onnx(path, part.spec, precision=precision)
    return OnnxPart(
        name=part.name, files=files, opset=info["opset"], exporter=exporter,
        precision=precision, nodes=info["nodes"], ops=info["ops"],
        seconds=round(time.perf_counter() - t0, 3),
    )


def _float16_converter() -> Any:
    """ONNX Runtime's copy of onnxconverter-common's converter, without its sys.path edit."""
    saved = list(sys.path)
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as e:  # pragma: no cover - onnxruntime is a dependency
        raise ExportError(
            f"precision fp16 needs onnxruntime's float16 converter ({first_line(e, typed=True)})",
            setting="precision", value="fp16") from e
    finally:
        sys.path[:] = saved
    return convert_float_to_float16


def convert_to_fp16(path: Path) -> None:
    """Convert an fp32 ONNX file in place to fp16 with fp32 (and uint8/int64) I/O."""
    import onnx

    convert = _float16_converter()
    old = _external_locations(onnx.load(str(path), load_external_data=False))
    model = onnx.load(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert(model, keep_io_types=True, disable_shape_infer=False)
    _toposort(half.graph)  # the converter appends its input casts at the end
    onnx.save_model(half, str(path))
    for loc in old:
        (path.parent / loc).unlink(missing_ok=True)


def _toposort(graph: Any) -> None:
    """Reorder ``graph.node`` in place so that every node comes after its producers."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(x in available for x in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError(f"graph {graph.name!r} has a cycle or an undefined input")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _dims(value_info: Any) -> list[str | int]:
    out: list[str | int] = []
    for d in value_info.type.tensor_type.shape.dim:
        out.append(d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else "?")
    return out


def check_onnx(path: Path, spec: PartSpec, *, precision: str = "fp32") -> dict[str, Any]:
    """Check an exported part; raises :class:`ExportError` naming the part and the problem.

    - ``onnx.checker.check_model(full_check=True)`` (strict shape inference included);
    - no If/Loop/Scan anywhere (graph and local functions);
    - inputs/outputs exactly the spec's names, in order, with its dtypes, a symbolic
      first dimension and the spec's static per-sample shape;
    - gates: ``decision`` is produced by ArgMax;
    - ``fp16``: some float16 tensor exists inside (the I/O keep their types).

    Returns ``{"opset", "nodes", "ops"}``.
    """
    import onnx

    name = spec.name
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ExportError(f"{name}: ONNX checker failed ({first_line(e, typed=True)})") from e
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    nodes = list(graph.node) + [n for f in model.functions for n in f.node]
    ops = sorted({n.op_type for n in nodes})
    bad = sorted(set(ops) & FORBIDDEN_OPS)
    if bad:
        raise ExportError(f"{name}: graph contains control flow {bad}; expected a straight-line graph")
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    for kind, got, want in (("inputs", inputs, spec.inputs), ("outputs", list(graph.output), spec.outputs)):
        got_names = [v.name for v in got]
        want_names = [t.name for t in want]
        if got_names != want_names:
            raise ExportError(f"{name}: ONNX {kind} are {got_names}, expected {want_names}")
        for v, t in zip(got, want):
            elem = v.type.tensor_type.elem_type
            if elem != ONNX_ELEM_TYPES[t.dtype]:
                got_t = onnx.helper.tensor_dtype_to_np_dtype(elem) if elem else "undefined"
                raise ExportError(f"{name}: {kind[:-1]} '{v.name}' has dtype {got_t}, expected {t.dtype}")
            dims = _dims(v)
            if not dims or not isinstance(dims[0], str) or dims[0] in ("", "?"):
                raise ExportError(
                    f"{name}: {kind[:-1]} '{v.name}' has shape {dims}, expected a symbolic batch "
                    f"dimension first ({t.describe()})"
                )
            if [int(d) if not isinstance(d, str) else d for d in dims[1:]] != list(t.shape):
                raise ExportError(
                    f"{name}: {kind[:-1]} '{v.name}' has shape {dims}, expected {t.describe()}"
                )
    if "decision" in spec.output_names:
        producer = [n for n in graph.node if "decision" in n.output]
        if not producer or producer[0].op_type != "ArgMax":
            got_op = producer[0].op_type if producer else "nothing"
            raise ExportError(f"{name}: 'decision' is produced by {got_op}, expected ArgMax")
    if precision == "fp16":
        fp16 = ONNX_ELEM_TYPES["float16"]
        has_half = any(i.data_type == fp16 for i in graph.initializer) or any(
            a.t.data_type == fp16 for n in graph.node for a in n.attribute if a.HasField("t")
        ) or any(
            a.i == fp16 for n in graph.node if n.op_type == "Cast" for a in n.attribute
            if a.name == "to"
        )
        if not has_half:
            raise ExportError(f"{name}: fp16 export has no float16 tensor inside")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return {"opset": int(opset), "nodes": len(nodes), "ops": ops}

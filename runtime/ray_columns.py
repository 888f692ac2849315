"""A record as typed Arrow columns (what a Ray actor returns) and back (on the driver).

:func:`record_column` turns one record (``hms-run --json``'s dict, an error record
included) into a one-row Arrow struct column; :func:`record_from_column` is its inverse:
the same keys in the same order, the same values of the same Python types, so the JSON
line printed and stored for a video is the plain run's. Ray Data passes the column
through as it is (no inference, no pickled Python objects).

Layout, field by field in key order: a dict is a struct (an empty one, ``struct<>``);
str, int, float, bool and None are string, int64, double, bool and null; a list whose
items share one of those types is a list of it (an empty list, ``list<null>``). The
only other shape a record has, ``topk`` (``[label, probability]`` pairs), becomes two
list fields in its place, ``topk_labels`` (string) and ``topk_probs`` (double). Any other
value (a list mixing types, say) raises :class:`TypeError`: a field that needs a layout
here before a record may carry it.
"""

from __future__ import annotations

from typing import Any

PAIRS = {"topk": ("topk_labels", "topk_probs")}  # record key -> its two list fields
_FIRST_OF_PAIR = {labels: (key, probs) for key, (labels, probs) in PAIRS.items()}
_SECOND_OF_PAIR = {probs for _, probs in PAIRS.values()}


def record_column(record: dict[str, Any]) -> Any:
    """``record`` as a one-row ``pyarrow.StructArray`` (layout: module docstring)."""
    import pyarrow as pa

    flat: dict[str, Any] = {}
    for key, value in record.items():
        if key in PAIRS and isinstance(value, list):
            labels, probs = PAIRS[key]
            flat[labels] = [str(label) for label, _ in value]
            flat[probs] = [float(p) for _, p in value]
        else:
            flat[key] = value
    return pa.array([flat], type=_arrow_type(flat, key="record"))


def record_from_column(value: dict[str, Any]) -> dict[str, Any]:
    """The record whose :func:`record_column` holds ``value`` (that struct as Python)."""
    record: dict[str, Any] = {}
    for key, v in value.items():
        if key in _FIRST_OF_PAIR:
            name, probs = _FIRST_OF_PAIR[key]
            record[name] = [[label, p] for label, p in zip(v, value[probs])]
        elif key not in _SECOND_OF_PAIR:
            record[key] = v
    return record


def _arrow_type(value: Any, *, key: str) -> Any:
    import pyarrow as pa

    if value is None:
        return pa.null()
    if isinstance(value, bool):  # before int: bool is an int
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    if isinstance(value, str):
        return pa.string()
    if isinstance(value, dict):
        return pa.struct([(str(k), _arrow_type(v, key=f"{key}.{k}")) for k, v in value.items()])
    if isinstance(value, list):
        items = {_arrow_type(v, key=key) for v in value}
        if len(items) <= 1 and not any(isinstance(v, (dict, list)) for v in value):
            return pa.list_(items.pop() if items else pa.null())
    raise TypeError(f"record field {key!r}: no column layout for {value!r}")

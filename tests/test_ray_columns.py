"""A record as typed Arrow columns and back (runtime/ray_columns.py, what Ray actors return):
the inverse gives the same keys in the same order, the same values of the same types, and
so the same JSON line; no column is a Python object or JSON text."""

from __future__ import annotations

import json

import pytest
from runtime_helpers import (  # noqa: F401 - one_torch_thread is an autouse fixture
    assets,
    make_videos,
    one_torch_thread,
    ordered,
)

pa = pytest.importorskip("pyarrow")

from hms_deploy.runtime.ray_columns import record_column, record_from_column
from hms_deploy.runtime.results import record_json
from hms_deploy.runtime.session import Session


def _arrow_types(t):
    yield t
    for i in range(getattr(t, "num_fields", 0)):
        yield from _arrow_types(t.field(i).type)
    if pa.types.is_list(t):
        yield from _arrow_types(t.value_type)


def _round_trip(rec):
    col = record_column(rec)
    assert len(col) == 1 and pa.types.is_struct(col.type)
    for t in _arrow_types(col.type):  # Arrow's own types only: no extension (pickle) type
        assert not isinstance(t, pa.ExtensionType), t
    # through Arrow's IPC format, as a Ray block travels between processes
    sink = pa.BufferOutputStream()
    table = pa.table({"record": col})
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    back = pa.ipc.open_stream(sink.getvalue()).read_all()
    return col, record_from_column(back.column("record")[0].as_py())


def test_session_records_round_trip_key_for_key(tmp_path):
    bad = make_videos(tmp_path, 2, corrupt=(1,))[1]
    a = assets()
    with Session(engines_dir=a.engines) as s:
        recs = list(s.classify_many([a.video, bad], policy="rates:0.6,0.3"))
        recs += list(s.classify_many([a.silent], policy="learned", no_audio_policy="dense"))
        recs += list(s.classify_many([a.video], budget=1.0, policy="learned"))
    with Session(checkpoint=a.checkpoint, engine="torch") as s:  # + "checkpoint"
        recs.append(s.classify(a.video, policy="rates:0.6,0.3"))
    assert ["error" in r for r in recs] == [False, True, False, False, False]
    assert recs[2]["warnings"] and recs[2]["fallback"] is not None  # a non-empty str list
    assert recs[3]["stats"]["vetoed"] is not None  # a budget: the scheduler's vetoed counts
    for rec in recs:
        _, back = _round_trip(rec)
        assert ordered(back) == ordered(rec)
        assert record_json(back) == record_json(rec)  # the line printed and stored
    col, _ = _round_trip(recs[0])
    names = [col.type.field(i).name for i in range(col.type.num_fields)]
    assert names[names.index("label") + 2:][:2] == ["topk_labels", "topk_probs"]
    assert col.type.field("topk_labels").type == pa.list_(pa.string())
    assert col.type.field("topk_probs").type == pa.list_(pa.float64())
    assert col.type.field("stats").type.field("engine_calls").type.field(0).type == pa.int64()


def test_empty_containers_none_and_exact_types():
    rec = {"video": "v.mp4", "n": None, "empty": {}, "none": [], "flag": True, "i": 7,
           "x": 2.0, "topk": [["a", 1.0], ["b", 0.0]], "nested": {"z": {"y": [1, 0]}, "a": 1}}
    _, back = _round_trip(rec)
    assert ordered(back) == ordered(rec)
    assert json.dumps(back) == json.dumps(rec)
    assert record_from_column(record_column({"video": "v", "error": "broken"})[0].as_py()) == {
        "video": "v", "error": "broken"}


@pytest.mark.parametrize("value", [[1, 2.5], [["a", 1.0]], [{"a": 1}], ("a", 1), b"x"])
def test_a_value_without_a_layout_is_refused(value):
    with pytest.raises(TypeError, match="'record.f'"):
        record_column({"video": "v", "f": value})

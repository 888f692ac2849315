"""``--output results.jsonl``: appended, fsynced, resumable; torn last lines ignored."""

from __future__ import annotations

import json
import os

import pytest

from hms_deploy.errors import ConfigError
from hms_deploy.runtime.results import ResultsFile


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_append_and_done(tmp_path):
    out = tmp_path / "sub" / "r.jsonl"
    with ResultsFile(out) as r:
        assert not r.done("a.mp4")
        r.append({"video": "a.mp4", "label": "x"})
        r.append({"video": "b.mp4", "error": "broken"})
        assert r.done("a.mp4") and not r.done("b.mp4")
    assert [x["video"] for x in _lines(out)] == ["a.mp4", "b.mp4"]
    r = ResultsFile(out)
    assert r.done("a.mp4")
    assert r.done(os.path.abspath("a.mp4"))  # matched as an absolute path too
    assert not r.done("b.mp4")  # error lines are retried
    assert not r.torn
    r.append({"video": "b.mp4", "label": "y"})
    r.close()
    assert ResultsFile(out).done("b.mp4")
    assert len(_lines(out)) == 3  # old lines are kept


def test_torn_last_line_is_cut(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"video": "a.mp4", "label": "x"}\n{"video": "b.mp4", "lab')
    r = ResultsFile(out)
    assert r.torn
    assert r.done("a.mp4") and not r.done("b.mp4")
    r.append({"video": "b.mp4", "label": "y"})
    r.close()
    assert [x["video"] for x in _lines(out)] == ["a.mp4", "b.mp4"]


def test_complete_last_line_without_newline_is_kept(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"video": "a.mp4", "label": "x"}')
    r = ResultsFile(out)
    assert not r.torn and r.done("a.mp4")
    r.append({"video": "b.mp4", "label": "y"})
    r.close()
    assert [x["video"] for x in _lines(out)] == ["a.mp4", "b.mp4"]


def test_garbage_and_partial_lines_are_not_results(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('garbage\n[1, 2]\n{"video": "a.mp4", "partial": true}\n{"label": "x"}\n')
    r = ResultsFile(out)
    assert not r.done("a.mp4")
    r.close()


def test_output_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        ResultsFile(tmp_path)

"""A record is serialised once: the line ``--output`` stores is the printed JSON text plus
``source`` and ``settings``, byte for byte what serialising the extended record gives."""

from __future__ import annotations

import json

from hms_deploy.runtime.results import ResultsFile, record_json

S = {"model": "abc", "policy": "every:2", "T": 16, "budget": None}


def test_stored_line_is_the_printed_text_plus_source_and_settings(tmp_path):
    video = tmp_path / "a.mp4"
    video.write_bytes(b"video")
    rec = {"video": str(video), "label": "x", "score": 0.5, "topk": [["x", 0.5]],
           "stats": {"vetoed": {}, "engine_calls": {"head": 1}}}
    text = record_json(rec)
    with ResultsFile(tmp_path / "r.jsonl", settings=S) as r:
        r.append(rec, text)
    (line,) = (tmp_path / "r.jsonl").read_text().splitlines()
    stored = json.loads(line)
    expected = {**rec, "source": stored["source"], "settings": S}
    assert line == json.dumps(expected, separators=(", ", ": "))
    assert line.startswith(text[:-1] + ", \"source\": ")
    assert stored["source"]["path"] == str(video.resolve())


"""Feature store: layout, crash safety (torn index line, unindexed features), resume,
refusals (other backbones, other geometry, a second writer), dataset lists and adapters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import video_features

from hms_deploy.data.datasets import activitynet_to_csv, fcvid_to_csv, read_list
from hms_deploy.data.features import FeatureStore, StoreMeta, backbone_hash, open_store
from hms_deploy.errors import DatasetError

DIMS = {"audio": 4, "appearance": 6, "motion": 8}
T = 3


def meta(**kw) -> StoreMeta:
    base = {"steps": T, "dtype": "float32", "dims": DIMS, "labels": ["a", "b"],
            "backbone_hash": "h" * 64, "shard_size": 2}
    base.update(kw)
    return StoreMeta(**base)


def feats(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {m: rng.standard_normal((T, d)).astype(np.float32) for m, d in DIMS.items()}


def add(store: FeatureStore, k: int) -> None:
    store.add(feats=feats(k), key=f"v{k}.mp4", path=f"/x/v{k}.mp4", label="ab"[k % 2],
              label_index=k % 2, duration_s=1.0 + k, has_audio=bool(k % 2))


def test_write_read_roundtrip_across_shards(tmp_path):
    s = FeatureStore.open_for_writing(tmp_path / "st", meta())
    for k in range(5):
        add(s, k)
    s.close()
    r = open_store(tmp_path / "st")
    assert r.keys() == [f"v{k}.mp4" for k in range(5)]
    assert [(x.shard, x.slot) for x in r.records] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    np.testing.assert_array_equal(r.label_indices(), [0, 1, 0, 1, 0])
    got = r.read([4, 1])
    for m in DIMS:
        np.testing.assert_array_equal(got[m][0], feats(4)[m])
        np.testing.assert_array_equal(got[m][1], feats(1)[m])
    assert video_features(r, "v2.mp4")["motion"].shape == (T, DIMS["motion"])
    assert (tmp_path / "st" / "features" / "motion" / "00001.bin").stat().st_size == 2 * T * 8 * 4


def test_float16_storage(tmp_path):
    s = FeatureStore.open_for_writing(tmp_path / "st", meta(dtype="float16"))
    add(s, 0)
    s.close()
    got = open_store(tmp_path / "st").read()["audio"][0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, feats(0)["audio"], rtol=1e-3, atol=1e-3)


def test_torn_index_line_and_unindexed_features_are_ignored_then_repaired(tmp_path):
    root = tmp_path / "st"
    s = FeatureStore.open_for_writing(root, meta())
    for k in range(3):
        add(s, k)
    s.write_features(feats(3))  # killed after the features, before the index line
    s.close()
    with (root / "index.jsonl").open("ab") as f:
        f.write(b'{"key": "v9.mp4", "path": "/x/v9')  # torn last line
    r = open_store(root)
    assert r.keys() == ["v0.mp4", "v1.mp4", "v2.mp4"]
    # a writer truncates both, and appends where the last complete record ended
    s = FeatureStore.open_for_writing(root, meta())
    assert (root / "index.jsonl").read_bytes().endswith(b"\n")
    assert (root / "features" / "audio" / "00001.bin").stat().st_size == 1 * T * 4 * 4
    add(s, 3)
    s.close()
    r = open_store(root)
    assert r.keys() == [f"v{k}.mp4" for k in range(4)]
    np.testing.assert_array_equal(r.read([3])["motion"][0], feats(3)["motion"])


def test_reopen_refuses_other_backbones_or_geometry(tmp_path):
    s = FeatureStore.open_for_writing(tmp_path / "st", meta())
    s.close()
    with pytest.raises(DatasetError, match="backbone_hash"):
        FeatureStore.open_for_writing(tmp_path / "st", meta(backbone_hash="z" * 64))
    with pytest.raises(DatasetError, match="steps 3 \\(store\\) vs 5"):
        FeatureStore.open_for_writing(tmp_path / "st", meta(steps=5))
    r = open_store(tmp_path / "st")
    with pytest.raises(DatasetError, match="other backbones"):
        r.check_backbones("z" * 64)


def test_second_writer_is_refused(tmp_path):
    s = FeatureStore.open_for_writing(tmp_path / "st", meta())
    try:
        with pytest.raises(DatasetError, match="another hms-extract"):
            FeatureStore.open_for_writing(tmp_path / "st", meta())
    finally:
        s.close()


def test_not_a_store(tmp_path):
    with pytest.raises(DatasetError, match="not a feature store"):
        open_store(tmp_path)
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(DatasetError, match="not empty and not a feature store"):
        FeatureStore.open_for_writing(tmp_path, meta())


def test_backbone_hash_covers_encoders_only():
    from hms_deploy.config import tiny_config
    from hms_deploy.model.hms import HMS

    cfg = tiny_config(3, steps=4)
    torch.manual_seed(0)
    sd = HMS(cfg).state_dict()
    h = backbone_hash(cfg, sd)
    sd2 = dict(sd)
    sd2["head.linear.weight"] = sd["head.linear.weight"] + 1  # not a backbone
    sd2["audio_backbone.projection.linear.bias"] = sd["audio_backbone.projection.linear.bias"] + 1
    assert backbone_hash(cfg, sd2) == h
    assert backbone_hash(cfg.replace(steps=9), sd) == h
    key = next(k for k in sd if k.startswith("motion_backbone.encoder.") and k.endswith("weight"))
    sd2[key] = sd[key] + 1e-3
    assert backbone_hash(cfg, sd2) != h


# ------------------------------------------------------------------------ dataset lists


def test_read_list_resolves_and_reports_row_problems(tmp_path):
    csv = tmp_path / "d" / "list.csv"
    csv.parent.mkdir()
    csv.write_text("label,path,extra\nx,a.mp4,1\n\ny,/abs/b.mp4,2\n,c.mp4,3\nz,,4\nx,a.mp4,5\n")
    d = read_list(csv)
    assert [(e.key, e.label, e.line) for e in d.entries] == [("a.mp4", "x", 2), ("/abs/b.mp4", "y", 4)]
    assert d.entries[0].path == csv.parent / "a.mp4"
    assert str(d.entries[1].path) == "/abs/b.mp4"
    errors = [p.error for p in d.problems]
    assert any("empty label" in e for e in errors)
    assert any("empty path" in e for e in errors)
    assert any("duplicate of line 2" in e for e in errors)


@pytest.mark.parametrize("text,match", [
    ("path,lbl\na.mp4,x\n", "missing column 'label'"),
    ("", "empty file"),
    ("file,label\n", "missing column 'path'"),
])
def test_read_list_missing_columns(tmp_path, text, match):
    p = tmp_path / "l.csv"
    p.write_text(text)
    with pytest.raises(DatasetError, match=match):
        read_list(p)


def test_activitynet_adapter(tmp_path):
    (tmp_path / "videos").mkdir()
    for vid in ("aaa", "bbb"):
        (tmp_path / "videos" / f"v_{vid}.mp4").write_bytes(b"")
    db = {"database": {
        "aaa": {"subset": "training", "annotations": [{"label": "Cooking", "segment": [0, 1]}]},
        "bbb": {"subset": "training", "annotations": [{"label": "Surfing"}, {"label": "Surfing"}]},
        "ccc": {"subset": "training", "annotations": [{"label": "Cooking"}]},  # no file
        "ddd": {"subset": "validation", "annotations": [{"label": "Archery"}]},
        "eee": {"subset": "testing", "annotations": []},
    }}
    (tmp_path / "anet.json").write_text(json.dumps(db))
    rep = activitynet_to_csv(tmp_path / "anet.json", tmp_path / "videos", tmp_path / "out" / "train.csv")
    assert rep.rows == 2 and rep.skipped == {"missing_file": 1}
    assert (tmp_path / "out" / "labels.txt").read_text().split() == ["Archery", "Cooking", "Surfing"]
    d = read_list(rep.csv)
    assert [(e.key, e.label) for e in d.entries] == [
        ("../videos/v_aaa.mp4", "Cooking"), ("../videos/v_bbb.mp4", "Surfing")]
    assert d.entries[0].path.resolve() == (tmp_path / "videos" / "v_aaa.mp4").resolve()


def test_fcvid_adapter(tmp_path):
    (tmp_path / "v" / "cake").mkdir(parents=True)
    (tmp_path / "v" / "cake" / "a.mp4").write_bytes(b"")
    (tmp_path / "v" / "cake" / "b.mp4").write_bytes(b"")
    (tmp_path / "split.txt").write_text("cake/a.mp4 train\ncake/b.mp4 test\ncake/c.mp4 train\n")
    (tmp_path / "label.txt").write_text("0 1 0\n0 1 0\n1 0 0\n")
    (tmp_path / "cat.txt").write_text("beach\nmaking_cake\npanda\n")
    rep = fcvid_to_csv(tmp_path / "split.txt", tmp_path / "label.txt", tmp_path / "v",
                       tmp_path / "train.csv", categories=tmp_path / "cat.txt")
    assert rep.rows == 1 and rep.classes == 3 and rep.skipped == {"missing_file": 1}
    d = read_list(rep.csv)
    assert [(e.key, e.label) for e in d.entries] == [("v/cake/a.mp4", "making_cake")]
    (tmp_path / "label.txt").write_text("0 1 0\n")
    with pytest.raises(DatasetError, match="1 label rows, expected 3"):
        fcvid_to_csv(tmp_path / "split.txt", tmp_path / "label.txt", tmp_path / "v",
                     tmp_path / "train.csv")


def test_adapter_command(tmp_path, capsys):
    from hms_deploy.data.datasets import main

    db = {"database": {"aaa": {"subset": "validation", "annotations": [{"label": "Cooking"}]}}}
    (tmp_path / "a.json").write_text(json.dumps(db))
    assert main(["activitynet", str(tmp_path / "a.json"), str(tmp_path), str(tmp_path / "v.csv"),
                 "--subset", "validation", "--keep-missing"]) == 0
    assert "1 videos, 1 classes" in capsys.readouterr().out
    assert read_list(tmp_path / "v.csv").entries[0].key == "v_aaa.mp4"
    assert main(["fcvid", str(tmp_path / "nope.txt"), str(tmp_path / "nope2.txt"),
                 str(tmp_path), str(tmp_path / "f.csv")]) == 1
    assert "FCVID file not found" in capsys.readouterr().err

"""Checkpoints and hms-init: round trip, weights_only refusal, pretrained weights, CLI errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_features

from hms_deploy.checkpoint import (
    Checkpoint,
    init_checkpoint,
    load_backbone_weights,
    load_checkpoint,
    save_checkpoint,
)
from hms_deploy.config import make_config
from hms_deploy.errors import CheckpointError, ConfigError, WeightsError

BIN = Path(sys.executable).parent


def hms_init(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "hms-init"), *args], capture_output=True, text=True,
                          check=False)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ck") / "tiny.pt"
    save_checkpoint(init_checkpoint(make_config("tiny", 6), seed=3), path)
    return path


_FORWARD = """
import sys, torch
from hms_deploy.checkpoint import load_checkpoint
ck = load_checkpoint(sys.argv[1])
feats = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    out = ck.build_model().masked_forward(feats)
torch.save({"logits": out.logits, "appearance": out.appearance}, sys.argv[3])
"""


def test_checkpoint_loads_in_a_fresh_process_with_identical_outputs(tiny_ckpt, tmp_path):
    ck = load_checkpoint(tiny_ckpt)
    feats = random_features(ck.config, 2, 8)
    torch.save(feats, tmp_path / "feats.pt")
    with torch.no_grad():
        here = ck.build_model().masked_forward(feats)
    subprocess.run([sys.executable, "-c", _FORWARD, str(tiny_ckpt), str(tmp_path / "feats.pt"),
                    str(tmp_path / "out.pt")], check=True)
    there = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(there["logits"], here.logits)
    assert torch.equal(there["appearance"], here.appearance)


def test_checkpoint_carries_config_labels_and_costs(tiny_ckpt):
    ck = load_checkpoint(tiny_ckpt)
    assert ck.config == make_config("tiny", 6)
    assert ck.labels == [f"class_{i}" for i in range(6)]
    assert ck.costs["motion_backbone"] > ck.costs["appearance_backbone"] > ck.costs["audio_backbone"]
    payload = torch.load(tiny_ckpt, weights_only=True)
    assert payload["cost_unit"] == "GMAC"


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch evil_was_run",))


def test_checkpoint_with_pickled_objects_is_refused_without_running_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "evil.pt"
    torch.save({"format": "hms-deploy-checkpoint", "payload": _Evil()}, bad)
    with pytest.raises(CheckpointError, match="refused: the file holds pickled objects"):
        load_checkpoint(bad)
    assert not (tmp_path / "evil_was_run").exists()


def test_missing_corrupt_and_foreign_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(corrupt)
    for name, data, kind in (("notes.pt", b"hello\nworld\n", "text"), ("empty.pt", b"", "empty"),
                             ("blob.pt", b"\x00\x01\xfe binary", "another kind of file")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=rf"{name}: not a checkpoint \(it is {kind}, "):
            load_checkpoint(tmp_path / name)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match="not an hms-deploy checkpoint"):
        load_checkpoint(foreign)


def test_truncated_checkpoint_is_refused(tiny_ckpt, tmp_path):
    data = tiny_ckpt.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(cut)


def test_weights_that_do_not_fit_the_config_are_refused(tiny_ckpt):
    ck = load_checkpoint(tiny_ckpt)
    broken = Checkpoint(config=ck.config, state_dict={k: v for k, v in list(ck.state_dict.items())[1:]},
                        labels=ck.labels, costs=ck.costs)
    with pytest.raises(CheckpointError, match="1 missing"):
        broken.build_model()


def test_baseline_checkpoint_cannot_build_an_hms_model(tiny_ckpt):
    ck = load_checkpoint(tiny_ckpt)
    ck.policy = "early_fusion"
    with pytest.raises(CheckpointError, match="'early_fusion' baseline"):
        ck.build_model()


def test_labels_count_must_match():
    with pytest.raises(ConfigError, match="labels file has 2 classes, but num_classes is 6") as e:
        init_checkpoint(make_config("tiny", 6), labels=["a", "b"])
    assert e.value.settings == ("num_classes",)  # hms-init words it as --num-classes (below)


# ------------------------------------------------------------------- pretrained weights


def test_timm_three_channel_stem_is_adapted_to_one_channel(tmp_path):
    import timm

    rgb = timm.create_model("mobilenetv1_100", pretrained=False, in_chans=3, num_classes=1000)
    path = tmp_path / "mnv1.pth"
    torch.save({"state_dict": rgb.state_dict()}, path)
    mono = timm.create_model("mobilenetv1_100", pretrained=False, in_chans=1, num_classes=0)
    load_backbone_weights(mono, path, what="audio")
    w = rgb.state_dict()["conv_stem.weight"]
    assert torch.allclose(mono.state_dict()["conv_stem.weight"], w.sum(dim=1, keepdim=True))
    rest = [k for k in mono.state_dict() if k != "conv_stem.weight"]
    assert len(rest) > 50
    assert all(torch.equal(mono.state_dict()[k], rgb.state_dict()[k]) for k in rest)


def test_weights_for_the_wrong_backbone_are_refused(tmp_path):
    import timm

    effnet = timm.create_model("efficientnet_b3", pretrained=False, num_classes=1000)
    path = tmp_path / "effb3.pth"
    torch.save(effnet.state_dict(), path)
    mono = timm.create_model("mobilenetv1_100", pretrained=False, in_chans=1, num_classes=0)
    before = {k: v.clone() for k, v in mono.state_dict().items()}
    with pytest.raises(WeightsError, match="does not fit the audio backbone"):
        load_backbone_weights(mono, path, what="audio")
    assert all(torch.equal(before[k], v) for k, v in mono.state_dict().items())


def test_pytorchvideo_pyth_layout_is_read(tmp_path):
    from hms_deploy.model.backbones import TinySlowFast

    src = TinySlowFast(4, 32)
    path = tmp_path / "sf.pyth"
    torch.save({"model_state": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    dst = TinySlowFast(4, 32)
    load_backbone_weights(dst, path, what="motion")
    assert all(torch.equal(src.state_dict()[k], v) for k, v in dst.state_dict().items())


# ------------------------------------------------------------------------------ the CLI


def test_hms_init_tiny_writes_a_loadable_checkpoint(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("piano\nflute\ndrums\n")
    out = tmp_path / "ck.pt"
    r = hms_init("--variant", "tiny", "--num-classes", "3", "--labels", str(labels), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "GMAC/step" in r.stdout
    assert load_checkpoint(out).labels == ["piano", "flute", "drums"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variant", "huge", "--num-classes", "3"], "unknown variant 'huge'"),
        (["--variant", "tiny", "--num-classes", "4", "--labels", "{labels}"],
         "labels file has 3 classes, but --num-classes is 4"),
        (["--variant", "tiny", "--num-classes", "3", "--audio-weights", "{missing}"],
         "weights file not found"),
        (["--variant", "tiny", "--num-classes", "3", "--audio-weights", "{garbage}"],
         "not a weights file"),
    ],
)
def test_hms_init_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    (tmp_path / "garbage.pth").write_bytes(b"\x00\x01garbage")
    subs = {"labels": tmp_path / "labels.txt", "missing": tmp_path / "none.pth",
            "garbage": tmp_path / "garbage.pth"}
    args = [a.format(**subs) for a in args] + ["--out", str(tmp_path / "out.pt")]
    r = hms_init(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("hms-init: error:") and message in lines[0]
    assert not (tmp_path / "out.pt").exists()


def test_hms_init_wrong_backbone_weights_one_line(tmp_path):
    from hms_deploy.model.backbones import TinyConvNet

    path = tmp_path / "appearance_net.pth"
    torch.save(TinyConvNet(3, 16, 128).state_dict(), path)  # the appearance net, given as audio
    r = hms_init("--variant", "tiny", "--num-classes", "3", "--audio-weights", str(path),
                 "--out", str(tmp_path / "out.pt"))
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1
    assert "does not fit the audio" in r.stderr

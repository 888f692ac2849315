"""Backbone fine-tune (the recipe hms-finetune and the synthetic study share): only the
chosen encoders change, early stopping keeps the best validation epoch, frozen features
are looked up exactly, small validation sets warn, and the CLI writes a checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hms_deploy.checkpoint import init_checkpoint, load_checkpoint, save_checkpoint
from hms_deploy.config import MODALITIES, tiny_config
from hms_deploy.data.datasets import ListEntry
from hms_deploy.data.extraction import build_encoders
from hms_deploy.data.features import backbone_hash
from hms_deploy.data.synthetic import DEFAULT_CLASSES, render_class_video
from hms_deploy.errors import ConfigError
from hms_deploy.train.finetune import (
    FinetuneConfig,
    decode_dataset,
    finetune_backbones,
    split_entries,
)
from hms_deploy.train.step_classifier import StepClassifier, StepData, frozen_features

LABELS = list(DEFAULT_CLASSES[:3])


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    entries = []
    for k, label in enumerate(LABELS * 3):
        p = render_class_video(root / f"{k}.mp4", label, seed=0, index=k, duration_s=1.0,
                               fps=8, size=(64, 48))
        entries.append(ListEntry(k + 2, p.name, p, label))
    (root / "list.csv").write_text("path,label\n" + "".join(f"{e.key},{e.label}\n"
                                                            for e in entries))
    return root, entries


@pytest.fixture(scope="module")
def base():
    return init_checkpoint(tiny_config(3, steps=2), labels=LABELS, seed=1)


def test_finetune_changes_only_the_chosen_encoders(tmp_path, videos, base):
    _, entries = videos
    bad = ListEntry(99, "missing.mp4", tmp_path / "missing.mp4", LABELS[0])
    cfg = FinetuneConfig(modalities=["motion"], epochs=2, steps_per_video=2, batch_size=4,
                         workers=0, stop_accuracy=2.0, restarts=0)
    new, report = finetune_backbones(base, entries[:6] + [bad], cfg, val_entries=entries[6:],
                                     progress=False)
    assert report["videos"] == 6 and report["val_videos"] == 3
    assert len(report["decode_errors"]) == 1 and "missing.mp4" in report["decode_errors"][0]
    assert len(report["warnings"]) == 1 and "3 videos" in report["warnings"][0]
    run = report["runs"][0]
    assert run["trained"] == ["motion"] and run["inputs"] == ["audio", "appearance", "motion"]
    epochs = [e for e in run["epochs"] if "epoch" in e]
    kept = run["epochs"][-1]
    assert len(epochs) == 2 and all("val_step_accuracy" in e for e in epochs)
    assert kept["val_step_accuracy"] == max(e["val_step_accuracy"] for e in epochs)
    assert kept["kept_epoch"] == 1 + int(np.argmax([e["val_step_accuracy"] for e in epochs]))
    assert 0.0 <= run["val_step_accuracy"] <= 1.0
    changed = {k for k in base.state_dict if not torch.equal(base.state_dict[k], new.state_dict[k])}
    assert changed and all(k.startswith("motion_backbone.encoder.") for k in changed)
    assert new.costs == base.costs and new.labels == base.labels
    assert backbone_hash(new.config, new.state_dict) != backbone_hash(base.config, base.state_dict)
    assert new.extra["finetune"]["runs"][0]["trained"] == ["motion"]


def test_early_stopping_at_the_target_accuracy(videos, base):
    _, entries = videos
    cfg = FinetuneConfig(epochs=5, steps_per_video=1, batch_size=4, workers=0,
                         stop_accuracy=0.0, restarts=0)
    _, report = finetune_backbones(base, entries[:6], cfg, val_entries=entries[6:],
                                   progress=False)
    run = report["runs"][0]
    assert [e.get("epoch") for e in run["epochs"]] == [None, 1, None]
    assert run["epochs"][0]["linear_probe"]
    assert run["epochs"][-1]["kept_epoch"] == 1


def test_a_try_below_the_bar_restarts_and_the_best_try_is_kept(videos, base):
    _, entries = videos
    cfg = FinetuneConfig(epochs=1, steps_per_video=1, batch_size=4, workers=0,
                         restarts=1, restart_below=2.0)  # every try is "below": two tries
    new, report = finetune_backbones(base, entries[:6], cfg, val_entries=entries[6:],
                                     progress=False)
    info = report["runs"][0]["epochs"][-1]
    accs = info["tries_val_step_accuracy"]
    assert info["restarts"] == 1 and len(accs) == 2 and len(info["tries_epochs"]) == 2
    assert info["kept_try"] == 1 + int(np.argmax(accs))
    assert report["runs"][0]["epochs"][-2]["val_step_accuracy"] == max(accs)
    changed = {k for k in base.state_dict if not torch.equal(base.state_dict[k], new.state_dict[k])}
    assert changed and all(k.startswith("motion_backbone.encoder.") for k in changed)


def test_frozen_features_are_looked_up_exactly(videos, base):
    _, entries = videos
    vids, labels, _ = decode_dataset(entries[:3], base, 2, 0, progress=False)
    enc = build_encoders(base.config, base.state_dict)
    data = StepData(vids, labels, {m: frozen_features(enc[m], vids, m, 2, 4)
                                   for m in ("audio", "appearance")})
    dims = {m: base.config.backbone(m).feat_dim for m in MODALITIES}
    model = StepClassifier(enc, list(MODALITIES), ["motion"], dims, 3).eval()
    pairs = np.array([[0, 1], [2, 0], [1, 1]])
    with torch.no_grad():
        got = model(data, pairs)
        feats = []
        for m in MODALITIES:
            enc[m].eval()
            x = [vids[i].mel[t] if m == "audio" else vids[i].frames[t] if m == "appearance"
                 else vids[i].clips(np.array([t]))[0] for i, t in pairs]
            feats.append(enc[m](torch.from_numpy(np.stack(x))))
        want = model.linear(model.norm(torch.cat(feats, dim=1)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_config_and_split_errors(videos):
    _, entries = videos
    with pytest.raises(ConfigError, match="schedule 'step'"):
        FinetuneConfig(schedule="step").check()
    with pytest.raises(ConfigError, match="patience"):
        FinetuneConfig(patience=0).check()
    tr, va = split_entries(entries, 0.34, seed=0)
    assert sorted(e.label for e in va) == sorted(LABELS)  # one per class
    assert len(tr) == 6 and not {e.key for e in tr} & {e.key for e in va}


def test_finetune_cli(tmp_path, videos, base):
    from hms_deploy.cli.finetune import main as ft_main

    root, _ = videos
    save_checkpoint(base, tmp_path / "init.pt")
    args = ["--checkpoint", str(tmp_path / "init.pt"), "--list", str(root / "list.csv"),
            "--val-fraction", "0.34", "--out", str(tmp_path / "ft.pt"), "--epochs", "1",
            "--workers", "0", "--quiet", "--threads", "1", "--report", str(tmp_path / "r.json")]
    r = CliRunner().invoke(ft_main, args)
    assert r.exit_code == 0, r.output
    assert "motion fine-tuned on 6 videos" in r.output and "val step accuracy" in r.output
    assert "hms-finetune: warning: validation set too small" in r.output
    new = load_checkpoint(tmp_path / "ft.pt")
    assert new.extra["finetune"]["runs"][0]["trained"] == ["motion"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["videos"] == 6 and report["config"]["augment"] is True
    # --no-colour-jitter: the recipe without jitter (another trajectory, same seed)
    r = CliRunner().invoke(ft_main, [*args[:-2], "--no-colour-jitter", "--out",
                                     str(tmp_path / "plain.pt"), "--report",
                                     str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p.json").read_text())["config"]["augment"] is False
    plain = load_checkpoint(tmp_path / "plain.pt")
    key = "motion_backbone.encoder.net.fast.net.0.weight"
    assert not torch.equal(plain.state_dict[key], new.state_dict[key])
    r = CliRunner().invoke(ft_main, [*args[:2], "--list", str(tmp_path / "nope.csv"),
                                     "--out", str(tmp_path / "x.pt")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "nope.csv" in r.output
    r = CliRunner().invoke(ft_main, [*args, "--modalities", "X"])
    assert r.exit_code == 2 and "unknown modality 'X'" in r.output

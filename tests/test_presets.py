"""hms-train presets (auto picks 'small' on small stores; explicit options win) and the
warning for a validation set too small to mean anything (library, hms-train)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_train import C, write_store

from hms_deploy.checkpoint import init_checkpoint, save_checkpoint
from hms_deploy.config import tiny_config
from hms_deploy.errors import ConfigError
from hms_deploy.train.config import TrainConfig
from hms_deploy.train.loop import train
from hms_deploy.train.presets import (
    SMALL_DATA_VIDEOS,
    preset_values,
    resolve_preset,
    small_validation_warning,
)

NAMES = ["x", "y", "z"]


def test_resolve_preset():
    assert resolve_preset("auto", 36) == "small"
    assert resolve_preset("auto", SMALL_DATA_VIDEOS) == "paper"
    assert resolve_preset("paper", 10) == "paper"
    with pytest.raises(ConfigError, match="preset 'fast'"):
        resolve_preset("fast", 10)
    assert preset_values("small", "hms")["lr"] == 1e-3
    assert preset_values("paper", "hms") == {}  # TrainConfig's defaults: docs/method.md §4


def test_small_validation_warning_bounds():
    assert small_validation_warning(np.repeat([0, 1, 2], 4), NAMES) is None  # 12, 4 per class
    w = small_validation_warning(np.array([0, 1, 2, 2]), NAMES)
    assert w is not None and "4 videos" in w and "x (1)" in w and "y (1)" in w
    assert "z (" not in w
    w = small_validation_warning(np.repeat([0, 1, 2], 3), NAMES)  # 9 < 10 videos
    assert w is not None and "9 videos" in w and "fewer than" not in w
    w = small_validation_warning(np.repeat([0, 1], 6), NAMES)  # a class absent
    assert w is not None and "z (0)" in w


@pytest.fixture(scope="module")
def ckpt():
    return init_checkpoint(tiny_config(C, steps=6), labels=NAMES, seed=0)


def test_train_warns_on_a_small_validation_split(tmp_path, ckpt):
    store = write_store(tmp_path / "st", ckpt, per_class=3)  # val: 1 video per class
    res = train(ckpt, store, TrainConfig(epochs=1, batch_size=4), progress=False)
    assert len(res.warnings) == 1 and "3 videos" in res.warnings[0]
    big = write_store(tmp_path / "big", ckpt, per_class=20)  # val: 4 per class, 12 videos
    assert train(ckpt, big, TrainConfig(epochs=1), progress=False).warnings == []


def test_train_cli_preset_and_warning(tmp_path, ckpt):
    from hms_deploy.cli.train import main as train_main

    store = write_store(tmp_path / "st", ckpt, per_class=3)
    save_checkpoint(ckpt, tmp_path / "init.pt")
    base = ["--store", str(store.root), "--checkpoint", str(tmp_path / "init.pt"), "--quiet",
            "--threads", "1"]
    r = CliRunner().invoke(train_main, [*base, "--out", str(tmp_path / "a.pt"), "--epochs", "2",
                                        "--log", str(tmp_path / "a.json")])
    assert r.exit_code == 0, r.output
    assert "hms-train: warning: validation set too small" in r.output
    cfg = json.loads((tmp_path / "a.json").read_text())["config"]
    small = preset_values("small", "hms")
    assert cfg["epochs"] == 2 and cfg["lr"] == small["lr"] and cfg["lam"] == small["lam"]
    assert len(json.loads((tmp_path / "a.json").read_text())["warnings"]) == 1
    r = CliRunner().invoke(train_main, [*base, "--out", str(tmp_path / "b.pt"), "--epochs", "1",
                                        "--preset", "paper", "--log", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "b.json").read_text())["config"]
    assert cfg["lr"] == TrainConfig().lr and cfg["lam"] == TrainConfig().lam

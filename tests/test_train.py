"""Training on frozen features: HMS learns a separable toy set, keeps the best validation
epoch, carries the encoders unchanged; the early-fusion baseline trains, is evaluable and
is refused by build_model; a store from other backbones is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hms_deploy.checkpoint import CheckpointError, init_checkpoint, load_checkpoint, save_checkpoint
from hms_deploy.config import parse_modalities, tiny_config
from hms_deploy.data.feature_batches import FeatureSource, stratified_split
from hms_deploy.data.features import FeatureStore, StoreMeta, backbone_hash, open_store
from hms_deploy.errors import DatasetError
from hms_deploy.metrics import mean_average_precision
from hms_deploy.model.baselines import build_early_fusion, early_fusion_cost
from hms_deploy.train.config import TrainConfig
from hms_deploy.train.loop import fold_normalization, train

C, T = 3, 6


@pytest.fixture(scope="module")
def ckpt():
    return init_checkpoint(tiny_config(C, steps=T), labels=["x", "y", "z"], seed=0)


def write_store(root, ckpt, per_class=20, seed=0, hash_=None):
    """Toy raw features: class c shifts 4 audio dims and 4 appearance dims on a large,
    nearly constant offset (like real backbone features)."""
    cfg = ckpt.config
    dims = {m: cfg.backbone(m).feat_dim for m in ("audio", "appearance", "motion")}
    meta = StoreMeta(steps=T, dtype="float32", dims=dims, labels=list(ckpt.labels),
                     backbone_hash=hash_ or backbone_hash(cfg, ckpt.state_dict))
    rng = np.random.default_rng(seed)
    store = FeatureStore.open_for_writing(root, meta)
    for i in range(per_class * C):
        c = i % C
        f = {m: (0.5 + 0.01 * rng.standard_normal((T, d))).astype(np.float32)
             for m, d in dims.items()}
        f["audio"][:, 4 * c:4 * c + 4] += 0.02
        f["appearance"][:, 4 * c:4 * c + 4] += 0.02
        store.add(feats=f, key=f"v{i}", path=f"v{i}.mp4", label=ckpt.labels[c], label_index=c,
                  duration_s=2.0, has_audio=True)
    store.close()
    return open_store(root)


@pytest.fixture(scope="module")
def store(tmp_path_factory, ckpt):
    return write_store(tmp_path_factory.mktemp("train") / "st", ckpt)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ckpt, store):
    out = tmp_path_factory.mktemp("out")
    cfg = TrainConfig(epochs=12, batch_size=16, lr=3e-3, seed=0, gamma_i=0.5, gamma_m=0.1)
    res = train(ckpt, store, cfg, out=out / "hms.pt", log_path=out / "log.json", progress=False)
    return res, out


def test_hms_learns_and_loss_decreases(trained, ckpt, store):
    res, out = trained
    log = json.loads((out / "log.json").read_text())["epochs"]
    assert len(log) == 12
    assert log[-1]["ce"] < 0.5 * log[0]["ce"]
    assert res.best_val_map >= 0.95
    for k in ("loss", "ce", "usage", "val_map", "val_gmacs_per_video", "train_usage", "tau", "lr"):
        assert k in log[0]
    assert log[1]["lr"] == pytest.approx(log[0]["lr"] * 0.92)
    assert log[1]["tau"] == pytest.approx(5.0 * 0.965)


def test_best_checkpoint_is_the_best_validation_epoch(trained, ckpt, store):
    res, out = trained
    log = res.log
    best = max(range(len(log)), key=lambda i: (log[i]["val_map"], -log[i]["val_ce"], -i))
    assert res.best_epoch == best + 1
    saved = load_checkpoint(out / "hms.pt")
    assert saved.extra["training"]["best_epoch"] == res.best_epoch
    # the saved (raw-feature, folded) model reproduces the logged validation mAP
    _, val_idx = stratified_split(store.label_indices(), 0.2, 0)
    model = saved.build_model()
    src = FeatureSource(store, val_idx)
    with torch.no_grad():
        out_ = model.masked_forward(src.get(np.arange(len(src))), tau=None)
    got = mean_average_precision(out_.logits.numpy(), src.labels.numpy())
    assert got == pytest.approx(log[best]["val_map"], abs=1e-9)
    assert saved.config.steps == T and saved.policy == "hms"


def test_encoders_are_carried_unchanged(trained, ckpt):
    saved = load_checkpoint(trained[1] / "hms.pt")
    enc = [k for k in ckpt.state_dict if ".encoder." in k]
    assert enc
    for k in enc:
        assert torch.equal(saved.state_dict[k], ckpt.state_dict[k]), k
    assert backbone_hash(saved.config, saved.state_dict) == backbone_hash(ckpt.config,
                                                                          ckpt.state_dict)
    assert saved.costs == ckpt.costs


def test_fold_normalization_is_exact():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3)
    mu, sd = np.linspace(0.1, 0.5, 5), np.linspace(1e-3, 2.0, 5)
    x = torch.randn(7, 5, dtype=torch.float64) * torch.from_numpy(sd) + torch.from_numpy(mu)
    want = lin.double()((x - torch.from_numpy(mu)) / torch.from_numpy(sd))
    sd_ = {"l.weight": lin.weight.detach().float(), "l.bias": lin.bias.detach().float()}
    fold_normalization(sd_, "l", (mu, sd))
    got = x @ sd_["l.weight"].double().T + sd_["l.bias"].double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_early_fusion_trains_is_evaluable_and_refused_by_build_model(tmp_path, ckpt, store):
    cfg = TrainConfig(policy="early_fusion", modalities=parse_modalities("A+I"), epochs=4,
                      batch_size=16, lr=3e-3)
    res = train(ckpt, store, cfg, out=tmp_path / "ef.pt", progress=False)
    saved = load_checkpoint(tmp_path / "ef.pt")
    assert saved.policy == "early_fusion" and saved.modalities == ["audio", "appearance"]
    with pytest.raises(CheckpointError, match="baseline"):
        saved.build_model()
    model = build_early_fusion(saved)
    # its cost: T * (backbone parts + fusion LSTM) + head, the LSTM counted as 4H(in+H) MACs
    h, p = model.hidden, ckpt.config.audio.proj_dim + ckpt.config.appearance.proj_dim
    assert saved.costs["early_fusion_cell"] == pytest.approx(4 * h * (p + h) / 1e9, rel=1e-6)
    assert saved.costs["early_fusion_head"] == pytest.approx(h * C / 1e9, rel=1e-6)
    want = T * (ckpt.costs["audio_backbone"] + ckpt.costs["appearance_backbone"]
                + saved.costs["early_fusion_cell"]) + saved.costs["early_fusion_head"]
    assert early_fusion_cost(saved.costs, saved.modalities, T) == pytest.approx(want)
    assert res.log[-1]["val_gmacs_per_video"] == pytest.approx(want)
    assert backbone_hash(saved.config, saved.state_dict) == store.meta.backbone_hash

    from hms_deploy.cli.evaluate import main as eval_main

    r = CliRunner().invoke(eval_main, ["--store", str(store.root), "--checkpoint",
                                       str(tmp_path / "ef.pt"), "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["policy"] == "early_fusion" and result["name"] == "early fusion A+I"
    assert result["gmacs_per_video"] == pytest.approx(want)
    assert result["map"] > 0.9
    assert (tmp_path / "ev" / "cost_vs_map.png").stat().st_size > 1000


def test_store_from_other_backbones_is_refused(tmp_path, ckpt):
    other = write_store(tmp_path / "st", ckpt, per_class=2, hash_="0" * 64)
    with pytest.raises(DatasetError, match="other backbones"):
        train(ckpt, other, TrainConfig(epochs=1), progress=False)


def test_train_cli(tmp_path, ckpt, store):
    from hms_deploy.cli.train import main as train_main

    save_checkpoint(ckpt, tmp_path / "init.pt")
    r = CliRunner().invoke(train_main, [
        "--store", str(store.root), "--checkpoint", str(tmp_path / "init.pt"),
        "--out", str(tmp_path / "t.pt"), "--epochs", "2", "--lr", "3e-3", "--quiet",
        "--log", str(tmp_path / "log.json"), "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "best epoch" in r.output and (tmp_path / "t.pt").is_file()
    r = CliRunner().invoke(train_main, [
        "--store", str(store.root), "--checkpoint", str(tmp_path / "init.pt"),
        "--out", str(tmp_path / "t2.pt"), "--policy", "early_fusion", "--modalities", "A+X"])
    assert r.exit_code == 2 and "unknown modality 'X'" in r.output  # a usage error

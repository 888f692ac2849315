"""ONNX export of every part, its checks, dynamic batch, parity with PyTorch, fp16, safety.

One tiny checkpoint (gates tuned on a generated video so that decisions are mixed) is
exported once per module; the paper-size export is in the slow test at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import call_part

from hms_deploy.checkpoint import init_checkpoint, load_checkpoint, save_checkpoint
from hms_deploy.cli.common import flag_advice
from hms_deploy.config import tiny_config
from hms_deploy.errors import ExportError
from hms_deploy.export import validate as V
from hms_deploy.export.modules import export_parts
from hms_deploy.export.onnx import check_onnx, export_part
from hms_deploy.export.pipeline import ExportOptions, check_out_dir, export_checkpoint
from hms_deploy.parts import PART_NAMES, part_specs, random_inputs
from hms_deploy.runtime.manifest import load_manifest

STEPS = 10
FAST = V.ValidationOptions(random_batches=(1,), gate_samples=1000, steps=3)


@torch.no_grad()
def mix_gates(model, mel: torch.Tensor) -> None:
    """Make both gates follow a direction of p^A (which varies over the video) so that the
    decisions on this video are mixed: appearance above the median step, motion above the
    30 % quantile (motion is evaluated only where appearance ran)."""
    p_a = model.audio_backbone(mel)  # (T, P_A)
    g = torch.Generator().manual_seed(0)
    for gate, q in ((model.appearance_gate, 0.5), (model.motion_gate, 0.3)):
        u = torch.randn(p_a.shape[1], generator=g)
        proj = p_a @ u
        scale = proj.std().clamp_min(1e-12)
        w, b = gate.linear.weight, gate.linear.bias
        w.zero_()
        b.zero_()
        w[1, : p_a.shape[1]] = u / scale
        b[1] = -torch.quantile(proj / scale, q)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(checkpoint with mixed gates, video, model) in a module-wide folder."""
    from hms_deploy.data.synthetic import make_sample_video

    root = tmp_path_factory.mktemp("export")
    video = root / "sample.mp4"
    make_sample_video(video, seed=1)
    ckpt = init_checkpoint(tiny_config(6), seed=0)
    model = ckpt.build_model()
    mix_gates(model, V.decoded_inputs(video, model.cfg, STEPS)[0]["audio_backbone"]["mel"])
    ckpt.state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_checkpoint(ckpt, root / "tiny.pt")
    return path, video, root


@pytest.fixture(scope="module")
def exported(assets):
    ckpt, video, root = assets
    out = root / "engines"
    opts = ExportOptions(validation=V.ValidationOptions(video=video, steps=STEPS))
    man = export_checkpoint(ckpt, out, opts)
    return man


def test_every_part_exported_checked_and_dynamic(exported):
    man = exported
    specs = part_specs(man.config)
    assert man.producer["opset"] == 17 and "legacy" in man.producer["exporter"]
    for name in PART_NAMES:
        path = man.path(name, "onnx")
        info = check_onnx(path, specs[name])  # checker(full_check), no If/Loop/Scan, I/O, symbolic N
        assert not {"If", "Loop", "Scan"} & set(info["ops"])
        model = onnx.load(str(path))
        for v in list(model.graph.input) + list(model.graph.output):
            assert v.type.tensor_type.shape.dim[0].dim_param == "N", (name, v.name)
        if name.endswith("_gate"):
            assert [n.op_type for n in model.graph.node if "decision" in n.output] == ["ArgMax"]


def test_ort_matches_torch_at_batch_1_and_3(assets, exported):
    import onnxruntime as ort

    model = load_checkpoint(assets[0]).build_model()
    parts = export_parts(model, load_checkpoint(assets[0]).costs)
    for name, part in parts.items():
        sess = ort.InferenceSession(str(exported.path(name)), providers=["CPUExecutionProvider"])
        for n in (1, 3):
            x = random_inputs(part.spec, n, seed=n)
            ref = call_part(part.module, part.spec, x)
            got = sess.run(part.spec.output_names, {k: v.numpy() for k, v in x.items()})
            for (out, r), g in zip(ref.items(), got):
                g = torch.from_numpy(g)
                assert g.shape == r.shape == (n, *part.spec.outputs[[o.name for o in part.spec.outputs].index(out)].shape)
                if r.dtype.is_floating_point:
                    scale = r.abs().max().item()
                    torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6 + 1e-5 * scale)
                else:
                    assert g.dtype == torch.int64 and torch.equal(g, r), (name, out)


def test_manifest_of_export(assets, exported):
    man = load_manifest(exported.dir)  # verifies every hash
    ckpt = load_checkpoint(assets[0])
    assert man.config == ckpt.config and man.labels == ckpt.labels
    for name in PART_NAMES:
        assert man.parts[name].gmac == pytest.approx(ckpt.costs[name])
    assert man.data["checkpoint"]["policy"] == "hms"
    for key in ("hms_deploy", "torch", "onnx", "onnxruntime", "opset"):
        assert man.producer[key]
    assert man.data["preprocessing"]["appearance"]["crop"] == ckpt.config.appearance.crop
    assert not list(exported.dir.parent.glob(".engines.*")), "staging directory left behind"


def test_parity_report(exported):
    p = exported.parity
    assert p["status"] == "passed" and p["precision"] == "fp32"
    for name in PART_NAMES:
        for kind in ("random", "realistic"):
            figs = p["parts"][name][kind]["outputs"]
            assert figs and all(f["status"] == "passed" for f in figs.values()), (name, kind)
    assert p["parts"]["motion_backbone"]["random"]["batches"] == [1, 3]
    for gate in ("appearance_gate", "motion_gate"):
        g = p["gates"][gate]
        assert g["samples"] >= 1000 and g["disagree_outside_ties"] == 0 and g["status"] == "passed"
        assert 0 < g["fired"] < g["samples"]
    e = p["end_to_end"]
    assert e["status"] == "passed" and e["decisions_equal"] and e["steps"] == STEPS
    assert e["top1_torch"] == e["top1_onnx"]
    # the checkpoint's gates were tuned so that the video's decisions are mixed
    assert 0 < e["usage"]["appearance"] < STEPS, e
    assert 0 < e["usage"]["motion"] <= e["usage"]["appearance"], e
    assert e["appearance"] == e["appearance_onnx"] and e["motion"] == e["motion_onnx"]


def test_end_to_end_is_the_runtimes_gated_loop(assets, exported):
    """The ONNX side of the parity report is what the runtime serves: the same decisions
    as a Session on the export, which really skips (cells run only where a gate fired)."""
    from hms_deploy.runtime import Session

    e = exported.parity["end_to_end"]
    with Session(engines_dir=exported.dir, engine="onnx") as session:
        rec = session.classify(assets[1], steps=STEPS)
    assert rec["decisions"] == {"appearance": e["appearance_onnx"], "motion": e["motion_onnx"]}
    calls = rec["stats"]["engine_calls"]
    assert calls["appearance_cell"] == sum(e["appearance_onnx"]) == calls["motion_gate"]
    assert calls["motion_cell"] == sum(e["motion_onnx"]) == calls["motion_backbone"]
    assert calls["appearance_gate"] == STEPS
    assert e["motion_backbone_runs"]["onnx"] == sum(e["motion_onnx"])


def test_validation_fails_naming_part_and_figure(assets, exported, tmp_path):
    """A head whose weights differ from the checkpoint's fails the export's parity check."""
    ckpt = load_checkpoint(assets[0])
    parts = export_parts(ckpt.build_model(), ckpt.costs)
    other = init_checkpoint(tiny_config(6), seed=5).build_model()
    wrong = export_parts(other, ckpt.costs)["head"]
    info = export_part(wrong, tmp_path)
    paths = {n: exported.path(n) for n in PART_NAMES}
    paths["head"] = tmp_path / info.files["onnx"]
    opts = V.ValidationOptions(random_batches=(1,), steps=3, video=assets[1])
    with pytest.raises(ExportError, match=r"parity check failed: head: random inputs: output 'probs' "
                                          r"out of tolerance \(max_abs"):
        V.validate_export(parts, paths, ckpt.config, options=opts)


def test_compare_figures():
    tol = V.Tolerance()
    r = torch.tensor([[1e-5, -2e-5, 3e-5]])
    f = V.compare(r, r * (1 + 1e-7), tol)
    assert f["ok"] and f["max_rel"] < 1e-6 and f["cosine"] > 0.99999
    bad = V.compare(r, r + 1e-6, tol)  # tiny absolute error, but 3% of the output's scale
    assert not bad["ok"] and bad["max_rel"] == pytest.approx(1 / 30, rel=1e-3)
    assert not V.compare(r, torch.full_like(r, float("nan")), tol)["ok"]
    assert V.compare(torch.tensor([0, 1]), torch.tensor([0, 0]), tol) == {"ok": False, "mismatches": 1, "n": 2}
    assert not V.compare(r, r[:, :2], tol)["ok"]


def test_gate_agreement_counts_ties():
    spec = part_specs(tiny_config(6))["appearance_gate"]

    def ref(part, x):
        logits = torch.stack([torch.zeros(x["x_a"].shape[0]), x["x_a"][:, 0]], 1)
        return {"decision": logits.argmax(1), "logits": logits}

    def flipped_at_ties(part, x):
        out = ref(part, x)
        tie = out["logits"][:, 1].abs() <= 1e-4
        out["decision"] = torch.where(tie, 1 - out["decision"], out["decision"])
        out["logits"] = out["logits"].clone()
        out["logits"][tie, 1] = torch.where(out["decision"][tie] == 1, 1e-6, -1e-6)
        return out

    def wrong(part, x):
        out = ref(part, x)
        out["decision"] = 1 - out["decision"]
        return out

    def with_ties(part, x):  # force some exact ties into the inputs
        x = dict(x)
        x["x_a"] = x["x_a"].clone()
        x["x_a"][::10, 0] = 0.0
        return x

    tol = V.Tolerance()
    g = V.gate_agreement(lambda p, x: ref(p, with_ties(p, x)),
                         lambda p, x: flipped_at_ties(p, with_ties(p, x)), spec, 1000, tol)
    assert g["ok"] and g["ties"] >= 100 and g["disagree_at_ties"] == g["ties"]
    g = V.gate_agreement(ref, wrong, spec, 1000, tol)
    assert not g["ok"] and g["disagree_outside_ties"] == 1000


def test_fp16_export(assets, tmp_path):
    man = export_checkpoint(assets[0], tmp_path / "fp16",
                            ExportOptions(precision="fp16", validation=FAST))
    assert man.precision == "fp16"
    p = man.parity
    assert p["status"] == "not validated" and "fp16" in p["note"]
    statuses = {f["status"] for r in p["parts"].values() for k in r.values() for f in k["outputs"].values()}
    statuses |= {g["status"] for g in p["gates"].values()} | {p["end_to_end"]["status"]}
    assert statuses == {"not validated"}
    specs = part_specs(man.config)
    f16 = onnx.TensorProto.FLOAT16
    for name in PART_NAMES:
        model = onnx.load(str(man.path(name)))
        io = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
        want = {t.name: {"float32": onnx.TensorProto.FLOAT, "uint8": onnx.TensorProto.UINT8,
                         "int64": onnx.TensorProto.INT64}[t.dtype]
                for t in specs[name].inputs + specs[name].outputs}
        assert io == want, name
        assert any(i.data_type == f16 for i in model.graph.initializer), name
        assert man.parts[name].precision == "fp16"


def test_control_flow_is_refused(tmp_path):
    from onnx import TensorProto, helper

    spec = part_specs(tiny_config(6))["head"]
    then = helper.make_graph([helper.make_node("Identity", ["h"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 128])])
    nodes = [
        helper.make_node("ReduceMax", ["h"], ["m"], keepdims=0),
        helper.make_node("ReduceMax", ["m"], ["s"], keepdims=0),
        helper.make_node("Cast", ["s"], ["cond"], to=TensorProto.BOOL),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=then),
        helper.make_node("MatMul", ["y", "w"], ["z"]),
        helper.make_node("Softmax", ["z"], ["probs"], axis=1),
    ]
    w = helper.make_tensor("w", TensorProto.FLOAT, [128, 6], [0.0] * 768)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 128])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 6])], initializer=[w])
    path = tmp_path / "head.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ExportError, match=r"head: graph contains control flow \['If'\]"):
        check_onnx(path, spec)


def test_static_batch_is_refused(tmp_path):
    ckpt = init_checkpoint(tiny_config(6))
    part = export_parts(ckpt.build_model(), ckpt.costs)["audio_cell"]
    path = tmp_path / "audio_cell.onnx"
    x = random_inputs(part.spec, 2)
    torch.onnx.export(part.module, tuple(x.values()), str(path), input_names=part.spec.input_names,
                      output_names=part.spec.output_names, opset_version=17, dynamo=False)
    with pytest.raises(ExportError, match=r"audio_cell: input 'x_a' has shape \[2, 32\], expected a symbolic batch"):
        check_onnx(path, part.spec)


def test_external_data(tmp_path):
    import onnxruntime as ort

    ckpt = init_checkpoint(tiny_config(6))
    part = export_parts(ckpt.build_model(), ckpt.costs)["motion_cell"]
    info = export_part(part, tmp_path, external_data=True)
    assert info.files == {"onnx": "motion_cell.onnx", "onnx_data": "motion_cell.onnx.data"}
    assert (tmp_path / "motion_cell.onnx").stat().st_size < 10_000
    sess = ort.InferenceSession(str(tmp_path / "motion_cell.onnx"), providers=["CPUExecutionProvider"])
    x = random_inputs(part.spec, 3)
    got = sess.run(None, {k: v.numpy() for k, v in x.items()})
    ref = call_part(part.module, part.spec, x)
    np.testing.assert_allclose(got[0], ref["h_next"].numpy(), rtol=1e-4, atol=1e-6)


def test_baseline_checkpoint_refused(tmp_path):
    ckpt = init_checkpoint(tiny_config(6))
    ckpt.policy, ckpt.modalities = "early_fusion", ["audio", "appearance"]
    path = save_checkpoint(ckpt, tmp_path / "ef.pt")
    with pytest.raises(ExportError, match=r"holds a 'early_fusion' baseline .* only HMS checkpoints"):
        export_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failed_export_leaves_nothing(assets, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise ExportError("parity check failed: simulated")

    monkeypatch.setattr(V, "validate_export", boom)
    out = tmp_path / "engines"
    with pytest.raises(ExportError, match="simulated"):
        export_checkpoint(assets[0], out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_out_dir_rules(tmp_path):
    check_out_dir(tmp_path / "new", force=False)
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty", force=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    # the library names the setting (force); hms-export words it as --force
    with pytest.raises(ExportError, match=r"other: output directory is not empty; use force") as e:
        check_out_dir(other, force=False)
    assert e.value.settings == ("force",)
    assert "use --force to replace" in flag_advice(e.value, {"force": "--force"})
    with pytest.raises(ExportError, match=r"not an hms-export directory .* even with force$") as e:
        check_out_dir(other, force=True)
    assert flag_advice(e.value, {"force": "--force"}).endswith("even with --force")
    (other / "manifest.json").write_text("{}")
    check_out_dir(other, force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match=r"file: exists and is not a directory"):
        check_out_dir(tmp_path / "file", force=True)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("HMS_SLOW"), reason="paper-size export (minutes): set HMS_SLOW=1")
def test_paper_export(tmp_path):
    from hms_deploy.config import paper_config

    ck = save_checkpoint(init_checkpoint(paper_config(239)), tmp_path / "paper.pt")
    man = export_checkpoint(ck, tmp_path / "engines")
    assert man.parity["status"] == "passed"
    gm = {m: man.parts[f"{m}_backbone"].gmac for m in ("audio", "appearance", "motion")}
    assert gm["audio"] == pytest.approx(0.069, abs=0.002)
    assert gm["appearance"] == pytest.approx(0.96, abs=0.01)
    assert gm["motion"] == pytest.approx(50.3, abs=0.2)
    assert Path(man.path("motion_backbone")).stat().st_size > 100e6

"""hms-export, hms-serve, hms-train and hms-finetune declare each setting once: the flag's
default is None (the options object's default is the one used and shown in --help) and
the options object's check is the only one; a bad value on the command line gives that check's error, with the
flag, before any file is looked at."""

from __future__ import annotations

import dataclasses

import click
import pytest
from click.testing import CliRunner

from hms_deploy.cli.common import flag_advice
from hms_deploy.cli.export import main as export_main
from hms_deploy.cli.serve import main as serve_main
from hms_deploy.errors import ConfigError
from hms_deploy.export.pipeline import ExportOptions
from hms_deploy.export.validate import ValidationOptions
from hms_deploy.runtime.serve.options import RepositoryOptions

PLAIN_TYPES = (click.types.IntParamType, click.types.FloatParamType, click.types.StringParamType)

# flag name -> (options object, its field); bad value
EXPORT_SETTINGS = {
    "engine": ("engine", "tensorrt"), "precision": ("precision", "fp8"), "opset": ("opset", 5),
    "max_batch": ("max_batch", 0), "opt_batch": ("opt_batch", 40), "steps": ("steps", 0),
}
SERVE_SETTINGS = {
    "engine": ("engine", "torch"), "device": ("device", "tpu"), "max_batch": ("max_batch", 0), "max_queue_delay_us": ("max_queue_delay_us", -1),
    "instances": ("instances", 0), "threads": ("threads", 0),
}


def _export_options(field: str, value: object) -> ExportOptions:
    if field == "steps":
        return ExportOptions(validation=ValidationOptions(steps=value))  # type: ignore[arg-type]
    return ExportOptions(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(("command", "settings", "defaults"), [
    (export_main, EXPORT_SETTINGS, {**dataclasses.asdict(ExportOptions()), "steps": ValidationOptions().steps}),
    (serve_main, SERVE_SETTINGS, dataclasses.asdict(RepositoryOptions())),
], ids=["hms-export", "hms-serve"])
def test_setting_flags_leave_default_and_check_to_the_options(command, settings, defaults):
    params = {p.name: p for p in command.params}
    ctx = click.Context(command)
    for name, (field, _) in settings.items():
        p = params[name]
        assert p.get_default(ctx, call=False) is None, f"{p.opts[0]} declares its own default"
        assert type(p.type) in PLAIN_TYPES, f"{p.opts[0]} is checked by click ({p.type})"
        if defaults[field] is not None:  # the options object's default is what --help shows
            assert f"[default: {defaults[field]}]" in " ".join(p.help.split()), p.opts[0]


@pytest.mark.parametrize("name", sorted(EXPORT_SETTINGS))
def test_hms_export_reports_the_options_own_check(name, tmp_path):
    field, bad = EXPORT_SETTINGS[name]
    with pytest.raises(ConfigError) as info:
        _export_options(field, bad).check()
    flags = {p.name: max(p.opts, key=len) for p in export_main.params}
    args = ["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "out"),
            flags[name], str(bad)]
    if name == "opt_batch":
        args += ["--max-batch", "4"]
        with pytest.raises(ConfigError) as info:
            ExportOptions(max_batch=4, opt_batch=40).check()
    r = CliRunner().invoke(export_main, args)
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == f"hms-export: error: {flag_advice(info.value, flags)}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", sorted(SERVE_SETTINGS))
def test_hms_serve_reports_the_options_own_check(name, tmp_path):
    field, bad = SERVE_SETTINGS[name]
    with pytest.raises(ConfigError) as info:
        RepositoryOptions(**{field: bad}).check()  # type: ignore[arg-type]
    flags = {p.name: max(p.opts, key=len) for p in serve_main.params}
    r = CliRunner().invoke(serve_main, ["--engines", str(tmp_path / "none"), flags[name], str(bad)])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == f"hms-serve: error: {flag_advice(info.value, flags)}"


# hms-train / hms-finetune: flag name -> (config field, bad value)
TRAIN_SETTINGS = {
    "policy": ("policy", "dense"), "epochs": ("epochs", 0), "batch_size": ("batch_size", 0),
    "lr": ("lr", 0.0), "lr_decay": ("lr_decay", 0.0), "tau": ("tau", -1.0),
    "tau_decay": ("tau_decay", 0.0), "lam": ("lam", -1.0), "gamma_i": ("gamma_i", 1.5),
    "gamma_m": ("gamma_m", -0.1), "val_fraction": ("val_fraction", 1.0), "seed": ("seed", None),
}
PRESET_FIELDS = ("epochs", "lr", "lr_decay", "lam", "gamma_m")
FINETUNE_SETTINGS = {
    "epochs": ("epochs", 0), "lr": ("lr", 0.0), "batch_size": ("batch_size", 0),
    "workers": ("workers", -1), "seed": ("seed", None),
}


def _help(param: click.Parameter) -> str:
    return " ".join((param.help or "").split())


def test_hms_train_flags_leave_defaults_to_train_config():
    from hms_deploy.cli.train import main as train_main
    from hms_deploy.train.config import TrainConfig
    from hms_deploy.train.presets import PRESETS

    params = {p.name: p for p in train_main.params}
    ctx = click.Context(train_main)
    base = TrainConfig()
    for name, (field, _) in TRAIN_SETTINGS.items():
        p = params[name]
        assert p.get_default(ctx, call=False) is None, f"{p.opts[0]} declares its own default"
        assert type(p.type) in PLAIN_TYPES, f"{p.opts[0]} is checked by click ({p.type})"
        value = getattr(base, field)
        if field in PRESET_FIELDS:  # each preset's value, the paper preset being the defaults
            assert f"paper {value:g}" in _help(p), p.opts[0]
            small = PRESETS["small"]["hms"][field]
            assert f"small {small:g}" in _help(p), p.opts[0]
        else:
            shown = value if isinstance(value, str) else f"{value:g}"
            assert f"[default: {shown}]" in _help(p), p.opts[0]
    assert params["modalities"].get_default(ctx, call=False) is None


def _train_args(tmp_path):
    return ["--store", str(tmp_path / "no-store"), "--checkpoint", str(tmp_path / "none.pt"),
            "--out", str(tmp_path / "out.pt")]


@pytest.mark.parametrize("name", sorted(n for n, (_, bad) in TRAIN_SETTINGS.items()
                                        if bad is not None))
def test_hms_train_reports_the_configs_own_check(name, tmp_path):
    """A bad value gets TrainConfig.check's error with the flag, exit 2, before the store
    (absent here) is opened."""
    from hms_deploy.cli.train import main as train_main
    from hms_deploy.train.config import TrainConfig

    field, bad = TRAIN_SETTINGS[name]
    with pytest.raises(ConfigError) as info:
        TrainConfig(**{field: bad}).check()
    flags = {p.name: max(p.opts, key=len) for p in train_main.params}
    r = CliRunner().invoke(train_main, [*_train_args(tmp_path), flags[name], str(bad)])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == f"hms-train: error: {flag_advice(info.value, flags)}"
    assert flags[name] in r.stderr


@pytest.mark.parametrize(("policy", "args", "named"), [
    ("hms", ["--hidden", "16"], "--hidden"),
    ("hms", ["--modalities", "A+M"], "--modalities"),
    ("early_fusion", ["--lambda", "3"], "--lambda"),
    ("early_fusion", ["--tau", "2", "--gamma-i", "0.5"], "--gamma-i"),
])
def test_hms_train_refuses_a_setting_the_policy_does_not_have(policy, args, named, tmp_path):
    from hms_deploy.cli.train import main as train_main

    r = CliRunner().invoke(train_main, [*_train_args(tmp_path), "--policy", policy, *args])
    assert r.exit_code == 2, r.output
    line = r.stderr.strip()
    assert line.startswith("hms-train: error: ") and len(line.splitlines()) == 1
    assert named in line and "--policy" in line and f"policy {policy}" in line


def test_hms_train_refuses_val_fraction_beside_val_store(tmp_path):
    from hms_deploy.cli.train import main as train_main

    r = CliRunner().invoke(train_main, [*_train_args(tmp_path), "--val-store", str(tmp_path),
                                        "--val-fraction", "0.3"])
    assert r.exit_code == 2, r.output
    assert "--val-fraction" in r.stderr and "--val-store" in r.stderr


def test_hms_finetune_flags_leave_defaults_to_the_recipe():
    from hms_deploy.cli.finetune import main as ft_main
    from hms_deploy.train.config import VAL_FRACTION, FinetuneConfig

    params = {p.name: p for p in ft_main.params}
    ctx = click.Context(ft_main)
    recipe = FinetuneConfig()
    for name, (field, _) in {**FINETUNE_SETTINGS, "val_fraction": ("val_fraction", None)}.items():
        p = params[name]
        assert p.get_default(ctx, call=False) is None, f"{p.opts[0]} declares its own default"
        assert type(p.type) in PLAIN_TYPES, f"{p.opts[0]} is checked by click ({p.type})"
        value = VAL_FRACTION if field == "val_fraction" else getattr(recipe, field)
        assert f"[default: {value:g}]" in _help(p), p.opts[0]
    assert recipe.modalities == ["motion"] and "[default: M]" in _help(params["modalities"])


@pytest.mark.parametrize("name", sorted(n for n, (_, bad) in FINETUNE_SETTINGS.items()
                                        if bad is not None))
def test_hms_finetune_reports_the_configs_own_check(name, tmp_path):
    from hms_deploy.cli.finetune import main as ft_main
    from hms_deploy.train.config import FinetuneConfig

    field, bad = FINETUNE_SETTINGS[name]
    with pytest.raises(ConfigError) as info:
        FinetuneConfig(**{field: bad}).check()
    flags = {p.name: max(p.opts, key=len) for p in ft_main.params}
    r = CliRunner().invoke(ft_main, ["--checkpoint", str(tmp_path / "none.pt"), "--list",
                                     str(tmp_path / "none.csv"), "--out", str(tmp_path / "o.pt"),
                                     flags[name], str(bad)])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == f"hms-finetune: error: {flag_advice(info.value, flags)}"
    assert not (tmp_path / "o.pt").exists()


# hms-extract: flag name -> (extract's parameter, bad value)
EXTRACT_SETTINGS = {"dtype": ("dtype", "float8"), "batch_size": ("batch_size", 0),
                    "shard_size": ("shard_size", 0), "steps": ("steps", 0)}


def test_hms_extract_flags_leave_defaults_and_checks_to_extract(tmp_path):
    import inspect

    from hms_deploy.cli.extract import main as extract_main
    from hms_deploy.data.extraction import check_extract_settings, extract

    params = {p.name: p for p in extract_main.params}
    ctx = click.Context(extract_main)
    defaults = inspect.signature(extract).parameters
    flags = {p.name: max(p.opts, key=len) for p in extract_main.params}
    for name, (field, bad) in EXTRACT_SETTINGS.items():
        p = params[name]
        assert p.get_default(ctx, call=False) is None, f"{p.opts[0]} declares its own default"
        assert type(p.type) in PLAIN_TYPES, f"{p.opts[0]} is checked by click ({p.type})"
        if defaults[field].default is not None:
            assert f"[default: {defaults[field].default}]" in _help(p), p.opts[0]
        with pytest.raises(ConfigError) as info:
            check_extract_settings(**{field: bad})
        r = CliRunner().invoke(extract_main, ["--checkpoint", str(tmp_path / "none.pt"), "--list",
                                              str(tmp_path / "none.csv"), "--out",
                                              str(tmp_path / "store"), flags[name], str(bad)])
        assert r.exit_code == 2, r.output
        assert r.stderr.strip() == f"hms-extract: error: {flag_advice(info.value, flags)}"
        assert not (tmp_path / "store").exists()


def test_hms_synth_flags_leave_defaults_to_the_library():
    import inspect

    from hms_deploy.cli.synth import main as synth_main
    from hms_deploy.data.synthetic import make_dataset, make_reference_video, make_sample_video

    commands = {  # subcommand -> (the library function, {flag: its parameter})
        "dataset": (make_dataset, {"duration": "duration_s", "fps": "fps", "workers": "workers"}),
        "reference": (make_reference_video, {"duration": "duration_s"}),
        "sample": (make_sample_video, {"seed": "seed"}),
    }
    for name, (function, flags) in commands.items():
        command = synth_main.commands[name]
        params = {p.name: p for p in command.params}
        ctx = click.Context(command)
        defaults = inspect.signature(function).parameters
        for flag, parameter in flags.items():
            p = params[flag]
            assert p.get_default(ctx, call=False) is None, f"{name} {p.opts[0]}"
            assert f"[default: {defaults[parameter].default:g}]" in _help(p), f"{name} {p.opts[0]}"


def test_hms_init_leaves_defaults_to_the_variant_and_refuses_a_setting_it_lacks(tmp_path):
    import inspect

    from hms_deploy.cli.init import main as init_main
    from hms_deploy.config import make_config, paper_config

    params = {p.name: p for p in init_main.params}
    ctx = click.Context(init_main)
    for name in ("motion_crop", "seed", "steps"):
        assert params[name].get_default(ctx, call=False) is None, name
    crop = inspect.signature(paper_config).parameters["motion_crop"].default
    assert f"[default: {crop}]" in _help(params["motion_crop"])
    with pytest.raises(ConfigError) as info:
        make_config("tiny", 3, motion_crop=256)
    assert info.value.settings == ("motion_crop", "variant")
    out = tmp_path / "ckpt.pt"
    r = CliRunner().invoke(init_main, ["--variant", "tiny", "--num-classes", "3", "--out", str(out),
                                       "--motion-size", "256"])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == ("hms-init: error: motion_crop: not a setting of --variant tiny "
                                "(--motion-size)")
    assert not out.exists()


def test_hms_eval_and_hms_init_show_the_librarys_defaults(tmp_path):
    """Where --help names a library default as text (the library would be a heavy import
    for --help), it is the library's."""
    import inspect

    from hms_deploy.checkpoint import init_checkpoint
    from hms_deploy.cli.evaluate import main as eval_main
    from hms_deploy.cli.init import main as init_main
    from hms_deploy.eval.evaluate import evaluate

    for command, function, name in ((eval_main, evaluate, "sample_videos"),
                                    (init_main, init_checkpoint, "seed")):
        p = next(p for p in command.params if p.name == name)
        assert p.get_default(click.Context(command), call=False) is None, p.opts[0]
        default = inspect.signature(function).parameters[name].default
        assert f"[default: {default}]" in _help(p), p.opts[0]
    r = CliRunner().invoke(eval_main, ["--store", str(tmp_path / "none"), "--checkpoint",
                                       str(tmp_path / "none.pt"), "--samples", "-1"])
    assert r.exit_code == 2, r.output


def test_hms_serve_endpoints_and_launch_sh_take_endpoints_defaults_and_check(capsys):
    from hms_deploy.runtime.serve.launch import Endpoints
    from hms_deploy.runtime.serve.launch import main as launch_main

    params = {p.name: p for p in serve_main.params}
    ctx = click.Context(serve_main)
    default = Endpoints()
    for name in ("host", "http_port", "grpc_port", "metrics_port"):
        assert params[name].get_default(ctx, call=False) is None, name
        assert f"[default: {getattr(default, name)}]" in _help(params[name]), name
    for args, setting in ((["--http-port", "0"], ("http_port",)),
                          (["--grpc-port", str(default.http_port)],
                           ("http_port", "grpc_port", "metrics_port"))):
        r = CliRunner().invoke(serve_main, ["--engines", "none", *args])
        assert r.exit_code == 2, r.output
        with pytest.raises(ConfigError) as info:
            Endpoints(**{f.replace("-", "_").lstrip("_"): int(v)
                         for f, v in zip(args[::2], args[1::2])}).check()
        assert info.value.settings == setting
        assert r.stderr.strip() == f"hms-serve: error: {flag_advice(info.value, _serve_flags())}"
    # launch.sh (a repository's own launcher) runs the same check before anything else
    assert launch_main(["no-repository", "--metrics-port", "70000"]) == 1
    assert "launch: error: metrics_port must be a TCP port" in capsys.readouterr().err


def _serve_flags() -> dict[str, str]:
    return {p.name: max(p.opts, key=len) for p in serve_main.params}


def test_a_lower_bound_has_one_wording():
    from hms_deploy.errors import require_at_least

    require_at_least("steps", None, 1)  # not given
    require_at_least("steps", 1, 1)
    with pytest.raises(ConfigError) as info:
        require_at_least("steps", 0, 1)
    assert str(info.value) == "steps must be >= 1, got 0"
    assert (info.value.settings, info.value.value, info.value.expected) == (("steps",), 0, ">= 1")
    with pytest.raises(ConfigError, match=r"^lr must be > 0, got 0.0$"):
        require_at_least("lr", 0.0, 0, strict=True)

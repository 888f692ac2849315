"""hms-export and hms-serve declare each setting once: the flag's default is None (the
options object's default is the one used and shown in --help) and the options object's
check is the only one; a bad value on the command line gives that check's error, with the
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
    "max_batch": ("max_batch", 0), "max_queue_delay_us": ("max_queue_delay_us", -1),
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

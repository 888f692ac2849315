"""One options object: every run setting is declared, defaulted and checked once, in
:class:`~hms_deploy.runtime.options.RunSettings`; the commands map flags onto its fields."""

from __future__ import annotations

import dataclasses
import inspect

import click
import pytest
from click.testing import CliRunner
from runtime_helpers import assets

from hms_deploy.cli.common import flag_advice
from hms_deploy.cli.run import main as run_main
from hms_deploy.cli.serve import main as serve_main
from hms_deploy.errors import ConfigError
from hms_deploy.runtime.options import FIELD_NAMES, KEY, RunSettings

# what hms-run takes besides run settings: the model, where records go, Ray's layout
RUN_NOT_SETTINGS = {
    "videos", "engines_dir", "checkpoint", "engine", "device", "explain", "as_json", "output",
    "output_mode", "progress", "ray", "ray_address", "workers", "threads_per_worker", "debug",
}
# the serving command's own options (ports, batching of requests, the server's process)
SERVE_NOT_SETTINGS = {
    "engines_dir", "engine", "device", "host", "http_port", "grpc_port", "metrics_port",
    "max_batch", "max_queue_delay_us", "allowed_root", "max_upload_mb", "instances", "threads",
    "drain_s", "exit_timeout_s", "log_verbose", "debug",
}
COMMANDS = [(run_main, RUN_NOT_SETTINGS), (serve_main, SERVE_NOT_SETTINGS)]
PLAIN_TYPES = (click.types.IntParamType, click.types.FloatParamType, click.types.StringParamType,
               click.types.BoolParamType)  # exactly these: IntRange, Choice... would check
DEFAULTS = RunSettings()


@pytest.mark.parametrize(("command", "others"), COMMANDS, ids=["hms-run", "hms-serve"])
def test_every_run_option_flag_is_one_field(command, others):
    names = [p.name for p in command.params]
    assert len(names) == len(set(names))  # no field reached by two flags
    settings = [p for p in command.params if p.name in FIELD_NAMES]
    unknown = set(names) - FIELD_NAMES - others
    assert not unknown, f"options neither a RunSettings field nor declared as not one: {unknown}"
    assert not FIELD_NAMES & others
    ctx = click.Context(command)
    for p in settings:
        # the default is RunSettings' (None: left to it) and the CLI does no checking of its own
        default, given = getattr(DEFAULTS, p.name), p.get_default(ctx, call=False)
        assert given is None or given in (default, str(default)), (p.name, given)
        assert type(p.type) in PLAIN_TYPES, f"{p.opts[0]} is checked by click ({p.type}), not RunSettings"


BAD_VALUES = {"steps": 0, "topk": 0, "batch_size": 0, "budget": -1.0, "policy": "sometimes",
              "no_audio_policy": "never"}


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_the_cli_reports_the_settings_own_check(field, tmp_path):
    """A bad value on the command line gives RunSettings' error (and the flag), before any
    model is looked up: the check exists once."""
    param = next(p for p in run_main.params if p.name == field)
    flag = max(param.opts, key=len)
    with pytest.raises(ConfigError) as info:
        RunSettings(**{field: BAD_VALUES[field]})
    expected = flag_advice(info.value, {p.name: max(p.opts, key=len) for p in run_main.params})
    r = CliRunner().invoke(run_main, ["v.mp4", "--engines", str(tmp_path / "none"), flag,
                                      str(BAD_VALUES[field])])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == f"hms-run: error: {expected}"


def test_the_source_of_a_check_is_named_by_field():
    with pytest.raises(ConfigError) as info:
        RunSettings(topk=0)
    e = info.value
    assert (e.setting, e.value) == ("topk", 0) and "--" not in str(e)
    assert flag_advice(e, {"topk": "--topk"}) == "--topk must be an integer >= 1, got 0"
    with pytest.raises(ConfigError) as info:
        RunSettings(budget=-2)
    assert flag_advice(info.value, {"budget": "--budget-gflops"}).endswith("(--budget-gflops)")
    with pytest.raises(ConfigError, match="unknown run setting"):
        RunSettings().with_overrides(stepz=3)


def test_resume_key_is_derived_from_the_fields():
    s = RunSettings(policy="every:2", budget=30, steps=6, topk=3, no_audio_policy="error",
                    allow_truncated=True, online=True, batch_size=4, appearance_batch=1)
    key = s.resume_key()
    marked = {f.metadata[KEY] for f in dataclasses.fields(RunSettings) if KEY in f.metadata}
    assert set(key) == marked
    assert key == {"policy": "every:2", "budget": 30.0, "T": 6, "topk": 3,
                   "no_audio_policy": "error", "allow_truncated": True}
    # what does not change a final record does not change the key
    assert dataclasses.replace(s, online=False, batch_size=1, appearance_batch=8).resume_key() == key


def test_replace_keeps_parsed_values():
    s = RunSettings(no_audio_policy="error", policy="rates:0.5,0.25")
    again = dataclasses.replace(s, topk=2)
    assert again.no_audio is None and str(again.policy) == str(s.policy)


def test_session_takes_settings_not_repeated_keywords():
    from hms_deploy.runtime.ray_batch import classify_ray
    from hms_deploy.runtime.session import Session

    for fn in (Session.options, Session.classify, Session.classify_many, classify_ray):
        params = inspect.signature(fn).parameters
        assert not FIELD_NAMES & set(params), fn.__name__  # settings arrive as one object
        assert any(p.kind is p.VAR_KEYWORD for p in params.values())


def test_ray_refuses_what_does_not_apply():
    from hms_deploy.runtime.ray_batch import classify_ray

    for bad in ({"online": True}, {"batch_size": 2}):
        with pytest.raises(ConfigError, match="does not apply to a run on a Ray actor pool"):
            classify_ray([str(assets().video)], engines_dir=assets().engines, **bad)


@pytest.mark.parametrize("args", [["--workers", "2"], ["--threads-per-worker", "2"]])
def test_ray_options_without_ray_are_refused(args):
    r = CliRunner().invoke(run_main, [str(assets().video), "--engines", str(assets().engines),
                                      *args])
    assert r.exit_code == 2 and f"{args[0]} needs --ray" in r.output, r.output

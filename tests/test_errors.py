"""Typed errors: fields below cli/, flag advice and exit codes in cli/; a bug is not a bad
input (it propagates: exit 3, the traceback with --debug)."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner
from runtime_helpers import assets

from hms_deploy.cli.common import EXIT_STOPPED, EXIT_USAGE, flag_advice, handle_errors
from hms_deploy.cli.run import main as run_main
from hms_deploy.errors import BackendUnavailable, ConfigError, HMSError
from hms_deploy.runtime import session as session_module
from hms_deploy.runtime.session import Session


def test_errors_carry_their_setting():
    e = ConfigError("batch_size must be >= 1, got 0", setting="batch_size", value=0,
                    expected=">= 1")
    assert (e.settings, e.value, e.expected) == (("batch_size",), 0, ">= 1")
    assert HMSError("x").settings == ()
    flags = {"batch_size": "--batch-size", "budget": "--budget-gflops", "engine": "--engine",
             "checkpoint": "--checkpoint"}
    assert flag_advice(e, flags) == "--batch-size must be >= 1, got 0"
    # a flag that is not the setting's own name is added, the message kept
    assert (flag_advice(ConfigError("budget must be > 0", setting="budget"), flags)
            == "budget must be > 0 (--budget-gflops)")
    both = ConfigError("engine torch needs checkpoint", setting=("engine", "checkpoint"))
    assert flag_advice(both, flags) == "--engine torch needs --checkpoint"
    assert flag_advice(ConfigError("no setting here"), flags) == "no setting here"


def _command(exc: BaseException):
    @click.command()
    @click.option("--debug", is_flag=True)
    @handle_errors("hms-x")
    def cmd(debug):
        raise exc

    return cmd


@pytest.mark.parametrize(("exc", "code"), [
    (ConfigError("bad"), EXIT_USAGE),
    (BackendUnavailable("TensorRT is not installed"), EXIT_STOPPED),
    (IndexError("a bug"), EXIT_STOPPED),
])
def test_exit_codes_live_in_the_cli(exc, code):
    r = CliRunner().invoke(_command(exc), [])
    assert r.exit_code == code and r.stderr.count("\n") == 1
    r = CliRunner().invoke(_command(exc), ["--debug"])
    assert r.exception is exc  # --debug: the exception itself, for its traceback


class _SchedulerBug(IndexError):
    pass


@pytest.fixture
def buggy_scheduler(monkeypatch):
    """Fault injection: the scheduler fails with a programming error, not a bad input."""
    def run_batch(*args, **kwargs):
        raise _SchedulerBug("index 9 is out of bounds")
        yield  # a generator, as the real one

    monkeypatch.setattr(session_module, "run_batch", run_batch)


def test_a_bug_is_not_an_error_record(buggy_scheduler):
    with Session(engines_dir=assets().engines) as s:
        with pytest.raises(_SchedulerBug):
            list(s.classify_many([str(assets().video)]))
        with pytest.raises(_SchedulerBug):  # nor is it retried video by video in a batch
            list(s.classify_many([str(assets().video)] * 2, batch_size=2))


def test_hms_run_stops_on_a_bug(buggy_scheduler):
    args = [str(assets().video), "--engines", str(assets().engines)]
    r = CliRunner().invoke(run_main, args)
    assert r.exit_code == EXIT_STOPPED, r.output
    assert "_SchedulerBug" in r.stderr and '"error"' not in r.stdout
    r = CliRunner().invoke(run_main, [*args, "--debug"])
    assert isinstance(r.exception, _SchedulerBug)


def _tensorrt_and_gpu() -> bool:
    import torch

    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Builder") and torch.cuda.is_available()


def test_a_missing_backend_stops_the_run_with_3():
    """docs/commands.md: a backend that is unavailable (TensorRT, a GPU) is exit 3."""
    import torch

    if _tensorrt_and_gpu():
        pytest.skip("TensorRT and a GPU are present")
    a = assets()
    r = CliRunner().invoke(run_main, [str(a.video), "--engines", str(a.engines), "--engine", "trt"])
    assert r.exit_code == EXIT_STOPPED and r.stderr.count("\n") == 1, r.output
    assert "TensorRT" in r.stderr or "CUDA" in r.stderr
    if not torch.cuda.is_available():
        r = CliRunner().invoke(run_main, [str(a.video), "--engines", str(a.engines),
                                          "--device", "cuda"])
        assert r.exit_code == EXIT_STOPPED and "no CUDA device" in r.stderr, r.output

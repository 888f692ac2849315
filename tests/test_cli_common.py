"""What every command shares: exit codes (2 for usage errors), a closed pipe ends quietly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from runtime_helpers import assets

from hms_deploy.cli.common import BROKEN_PIPE_EXIT, EXIT_USAGE, handle_errors
from hms_deploy.errors import ConfigError, VideoError
from hms_deploy.outputs import OutputLocked

BIN = Path(sys.executable).parent


def _command(exc: BaseException):
    @click.command()
    @handle_errors("hms-x")
    def cmd():
        raise exc

    return cmd


@pytest.mark.parametrize(("exc", "code"), [
    (ConfigError("--steps must be >= 1, got 0"), EXIT_USAGE),
    (VideoError("a.mp4: no such file"), 1),
    (KeyboardInterrupt(), 130),
    (OutputLocked("out.jsonl: another hms-run is writing it"), 3),  # a ConfigError, but a stop
])
def test_exit_codes(exc, code):
    r = CliRunner().invoke(_command(exc), [])
    assert r.exit_code == code
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("hms-x: error: ")


def test_closed_pipe_ends_quietly():
    """``hms-inspect DIR | head -1``: the reader is gone before the command writes."""
    exe = BIN / "hms-inspect"
    if not exe.exists():
        pytest.skip("console scripts are not installed")
    proc = subprocess.Popen([str(exe), str(assets().engines)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader went away (head -1 after its line)
    _, err = proc.communicate(timeout=120)
    assert err.decode() == "" and proc.returncode == BROKEN_PIPE_EXIT


@pytest.mark.parametrize("module", ["init", "extract", "train", "evaluate", "export", "run",
                                    "inspect", "synth", "bench"])
def test_every_command_has_short_help(module):
    import importlib

    main = importlib.import_module(f"hms_deploy.cli.{module}").main
    r = CliRunner().invoke(main, ["-h"])
    assert r.exit_code == 0 and r.stdout.startswith("Usage:"), r.output


NOPE = "/nonexistent-hms-test"
USAGE_CASES = [
    ("init", ["--variant", "tiny", "--num-classes", "0", "--out", f"{NOPE}/x.pt"]),
    ("extract", ["--checkpoint", f"{NOPE}.pt", "--list", f"{NOPE}.csv", "--out", NOPE,
                 "--workers", "-1"]),
    ("train", ["--store", NOPE, "--checkpoint", f"{NOPE}.pt", "--out", f"{NOPE}/t.pt",
               "--epochs", "0"]),
    ("train", ["--store", NOPE, "--checkpoint", f"{NOPE}.pt", "--out", f"{NOPE}/t.pt",
               "--val-fraction", "2"]),
    ("evaluate", ["--store", NOPE, "--checkpoint", f"{NOPE}.pt", "--budgets", "-3"]),
    ("export", ["--checkpoint", f"{NOPE}.pt", "--opset", "3"]),
    ("export", ["--checkpoint", f"{NOPE}.pt", "--steps", "0"]),
    ("run", [f"{NOPE}.mp4", "--engines", NOPE, "--policy", "sometimes"]),
    ("bench", ["--steps", "0"]),
    ("synth", ["dataset", NOPE, "--per-class", "0"]),
]


@pytest.mark.parametrize(("module", "args"), USAGE_CASES,
                         ids=[f"{m}{a[-2]}" for m, a in USAGE_CASES])
def test_usage_errors_exit_2_before_loading(module, args):
    """Every file named here is missing: a command that loaded first would say so, exit 1."""
    import importlib

    main = importlib.import_module(f"hms_deploy.cli.{module}").main
    r = CliRunner().invoke(main, args)
    assert r.exit_code == EXIT_USAGE, r.output
    assert "not found" not in r.output and "no such" not in r.output.lower()

"""No command-line flag below cli/: the library's messages name settings (and remedies as
library calls); the CLI words them as its flags and commands (cli/common.py flag_advice,
record_error_advice), so what a command prints stays its own."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hostile_media import faststart_cut, video
from runtime_helpers import assets, one_torch_thread  # noqa: F401 - autouse fixture

from hms_deploy.cli.common import flag_advice, record_error_advice
from hms_deploy.errors import EngineError, Note, VideoError
from hms_deploy.runtime.trt_plan import plan_remedy

REPO = Path(__file__).resolve().parents[1]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")
SHIPPED = ("hms_deploy", "export", "runtime")
# Flag-like strings below cli/ that are not this project's flags; each file says why.
ALLOWED = {
    # tritonserver's own options, in the argv of the process the launcher starts; and the
    # launcher's own argparse options (`python -m hms_deploy.runtime.serve.launch`, which
    # runs inside Triton's container), whose help names the command that writes its input
    "runtime/serve/launch.py": {
        "--model-repository", "--backend-directory", "--http-address", "--http-port",
        "--grpc-address", "--grpc-port", "--metrics-address", "--metrics-port",
        "--allow-gpu-metrics", "--exit-timeout-secs", "--strict-readiness", "--exit-on-error",
        "--model-control-mode", "--load-model", "--backend-config", "--log-verbose", "--host",
        "--triton-repo",
    },
    # the start script written into a model repository: tritonserver's and the launcher's
    # options, as the shell runs them
    "runtime/serve/repository.py": {
        "--host", "--http-port", "--grpc-port", "--metrics-port", "--model-repository"},
    # `python -m hms_deploy.data.datasets`: the dataset-list converter's own argparse options
    "hms_deploy/data/datasets.py": {"--subset", "--labels-out", "--keep-missing", "--categories"},
}


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                found.add(id(body[0].value))
    return found


def flags_in_strings(path: Path) -> list[tuple[int, str]]:
    """(line, flag) for every flag-like word in a string literal of ``path`` (f-string parts
    included), docstrings excepted (they document the commands)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docs = _docstrings(tree)
    return [(node.lineno, flag) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docs for flag in FLAG.findall(node.value)]


def test_no_flag_in_the_strings_below_cli():
    found, scanned = [], 0
    for root in SHIPPED:
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel.startswith("hms_deploy/cli/"):
                continue
            scanned += 1
            allowed = ALLOWED.get(rel, set())
            found += [f"{rel}:{line}: {flag}" for line, flag in flags_in_strings(path)
                      if flag not in allowed]
    assert scanned > 80  # the shipped tree, not an empty glob
    assert not found, "flags named below cli/ (name the setting; the CLI words it):\n" + \
        "\n".join(found)
    for rel, flags in ALLOWED.items():  # every allowed flag is still there (no stale entry)
        assert flags <= {f for _, f in flags_in_strings(REPO / rel)}, rel


def test_the_scan_sees_flags_in_f_strings_and_skips_docstrings(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('"""Run ``hms-run --json``."""\n'
                   'def f(x):\n    """``--docs``."""\n    return f"{x}: use --force to replace it"\n')
    assert flags_in_strings(src) == [(4, "--force")]


def test_setting_names_become_the_commands_flags():
    flags = {"no_audio_policy": "--no-audio-policy", "num_classes": "--num-classes",
             "budget": "--budget-gflops", "val_store": "--val-store"}
    e = VideoError("a.mp4: no audio track (refused by no_audio_policy error)",
                   setting="no_audio_policy")
    assert flag_advice(e, flags) == "a.mp4: no audio track (refused by --no-audio-policy error)"
    note = Note("give more videos (val_store)", settings=("val_store",))
    assert note == "give more videos (val_store)"  # a str for the library's callers
    assert flag_advice(note, flags) == "give more videos (--val-store)"
    assert flag_advice(Note("too small", settings=("budget",)), flags) == "too small (--budget-gflops)"
    err = EngineError("head: rebuild with `hms_deploy.export.add_trt_plans('/e')`",
                      remedy=plan_remedy("/e"))
    assert flag_advice(err, {}) == "head: rebuild with `hms-export --engines /e --engine trt`"
    # an error record's line: the path is left alone, underscore settings become flags
    line = "/v/no_audio_policy.mp4: no audio track (refused by no_audio_policy error)"
    assert record_error_advice(line, flags) == (
        "/v/no_audio_policy.mp4: no audio track (refused by --no-audio-policy error)")
    assert record_error_advice("a.mp4: budget spent", flags) == "a.mp4: budget spent"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return {"noaudio": video(d / "noaudio.mp4", audio="none"), "cut": faststart_cut(d / "cut.mp4")}


def test_records_name_settings_in_the_library_and_flags_on_the_command_line(media, tmp_path):
    """The same failures: Session's records name the settings, hms-run's records (printed
    and stored) name its flags, as they always did."""
    from hms_deploy.cli.run import main
    from hms_deploy.runtime.session import Session

    vids = [str(media["noaudio"]), str(media["cut"])]
    with Session(engines_dir=assets().engines) as s:
        lib = list(s.classify_many(vids, policy="learned", no_audio_policy="error"))
    assert lib[0]["error"].endswith("no audio track (refused by no_audio_policy error)")
    assert lib[1]["error"].endswith("(allow_truncated classifies the decodable part)")
    out = tmp_path / "r.jsonl"
    r = CliRunner().invoke(main, [*vids, "--engines", str(assets().engines), "--json",
                                  "--policy", "learned", "--no-audio-policy", "error",
                                  "--output", str(out), "--no-progress"])
    assert r.exit_code == 1, r.stderr
    printed = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    stored = [json.loads(x) for x in out.read_text().splitlines()]
    for recs in (printed, stored):
        assert [x["error"] for x in recs] == [
            lib[0]["error"].replace("no_audio_policy", "--no-audio-policy"),
            lib[1]["error"].replace("allow_truncated", "--allow-truncated")]
        assert recs[0]["error"].endswith("no audio track (refused by --no-audio-policy error)")


def test_library_warnings_name_settings_and_commands_word_them():
    from hms_deploy.data.extraction import _float16_warnings
    from hms_deploy.train.presets import small_validation_warning

    w = small_validation_warning(np.array([0, 1]), ["x", "y"], setting="val_list")
    assert w is not None and w.endswith("(val_list)") and w.settings == ("val_list",)
    assert flag_advice(w, {"val_list": "--val-list"}).endswith("(--val-list)")
    (w16,) = _float16_warnings({"audio": np.full((2, 3), 1e-6, np.float32)})
    assert w16.endswith("use dtype float32")
    assert flag_advice(w16, {"dtype": "--dtype"}).endswith("use --dtype float32")

"""The serving pieces without a server: request handling, repository, launcher, CLI errors."""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from runtime_helpers import assets, one_torch_thread  # noqa: F401 - autouse fixture

from hms_deploy.errors import ConfigError
from hms_deploy.runtime.options import RunSettings
from hms_deploy.runtime.serve.handler import Handler, RequestError, resolve_path
from hms_deploy.runtime.serve.launch import Endpoints, server_command, server_env
from hms_deploy.runtime.serve.repository import (
    RepositoryOptions,
    config_pbtxt,
    write_repository,
)
from hms_deploy.runtime.session import Session


def b(*values) -> np.ndarray:
    return np.array([[v.encode() if isinstance(v, str) else v] for v in values], dtype=object)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("root")
    (d / "sub").mkdir()
    (d / "sub" / "a.mp4").write_bytes(assets().video.read_bytes())
    (d / "inside.mp4").symlink_to(d / "sub" / "a.mp4")
    out = tmp_path_factory.mktemp("out") / "x.mp4"
    out.write_bytes(b"x")
    (d / "out.mp4").symlink_to(out)
    return d


@pytest.fixture(scope="module")
def session():
    with Session(engines_dir=assets().engines, threads=1) as s:
        yield s


def test_resolve_path(root):
    assert resolve_path("sub/a.mp4", root) == (root / "sub" / "a.mp4").resolve()
    assert resolve_path(str(root / "sub" / "a.mp4"), root) == (root / "sub" / "a.mp4").resolve()
    assert resolve_path("inside.mp4", root) == (root / "sub" / "a.mp4").resolve()
    with pytest.raises(RequestError, match=r"contains '\.\.'"):
        resolve_path("sub/../sub/a.mp4", root)
    with pytest.raises(RequestError, match="outside the allowed root"):
        resolve_path("out.mp4", root)
    with pytest.raises(RequestError, match="outside the allowed root"):
        resolve_path("/etc/hostname", root)
    with pytest.raises(RequestError, match="not a file"):
        resolve_path("sub", root)
    with pytest.raises(RequestError, match="disabled"):
        resolve_path("sub/a.mp4", None)


def test_handler_answers_each_request_of_a_batch(session, root):
    h = Handler(session, RepositoryOptions(allowed_root=root, max_upload_bytes=1 << 20, run=RunSettings(topk=3)))
    ref = session.classify(assets().video, topk=3)
    data = assets().video.read_bytes()
    answers = h.run([
        {"path": b("sub/a.mp4")},
        {"video": b(b"")},
        {"video": b(data), "name": b("mine.mp4")},
        {"path": b("sub/a.mp4"), "policy": b("never")},
        {"video": b(b"\0" * ((1 << 20) + 1))},
        {"video": b(b"garbage" * 40), "name": b("g.mp4")},
        # two rows in one request, with different policies: answered in row order
        {"path": b("sub/a.mp4", "inside.mp4"), "policy": b("dense", "learned"),
         "budget_gflops": np.array([[np.nan], [0.0]])},
    ])
    assert isinstance(answers[0], dict)
    rec = json.loads(answers[0]["record"][0, 0])
    assert rec["decisions"] == ref["decisions"] and rec["video"] == "sub/a.mp4"
    assert abs(rec["score"] - ref["score"]) < 1e-5 and len(rec["topk"]) == 3
    # the garbage upload shares its options: its batch failed and was rerun one by one
    assert rec["stats"]["batch"] in (1, 3)
    assert answers[1] == "input 'video' is empty (0 bytes)"
    up = json.loads(answers[2]["record"][0, 0])
    assert up["video"] == "mine.mp4" and up["decisions"] == ref["decisions"]
    assert answers[2]["label"][0, 0] == ref["label"].encode()
    assert answers[2]["score"].dtype == np.float32 and answers[2]["score"].shape == (1, 1)
    assert answers[3].startswith("unknown policy 'never'")
    assert "exceeds this server's limit of 1.0 MiB" in answers[4]
    assert answers[5].startswith("g.mp4: ") and "/tmp" not in answers[5]
    two = [json.loads(x) for x in answers[6]["record"][:, 0]]
    assert [r["policy"] for r in two] == ["dense", "learned"]
    assert [r["budget"] for r in two] == [None, None]  # NaN / <= 0: no budget
    assert two[1]["decisions"] == ref["decisions"]
    for a in answers:
        assert not isinstance(a, str) or "\n" not in a
    # valid requests with the same options are stepped together
    answers = h.run([{"path": b("sub/a.mp4")}, {"video": b(data), "name": b("mine.mp4")},
                     {"path": b("inside.mp4")}])
    recs = [json.loads(a["record"][0, 0]) for a in answers]
    assert [r["stats"]["batch"] for r in recs] == [3, 3, 3]
    assert all(r["decisions"] == ref["decisions"] for r in recs)


def test_handler_rejects_malformed_inputs(session, root):
    h = Handler(session, RepositoryOptions(allowed_root=root))
    answers = h.run([
        {},
        {"video": b(b"x"), "path": b("sub/a.mp4")},
        {"path": np.array([[b"\xff\xfe"]], dtype=object)},
        {"path": b("sub/a.mp4"), "policy": b("dense", "dense")},
        {"path": b("sub/a.mp4"), "budget_gflops": np.array([[1e-9]])},
        {"path": b("sub/a.mp4"), "extra": b("x")},
        {"video": b(b"garbage" * 40), "name": b("odd/.mp4\x00")},  # names never reach the disk
    ])
    assert answers[0].startswith("missing input")
    assert "not both" in answers[1]
    assert "not UTF-8" in answers[2]
    assert "has 2 row(s), the request has 1" in answers[3]
    assert "cannot afford one step" in answers[4]
    assert "unknown input(s) extra" in answers[5]
    assert answers[6].startswith("odd/.mp4\x00: not a readable media file"), answers[6]


def test_config_and_repository(tmp_path):
    opts = RepositoryOptions(max_batch=4, max_queue_delay_us=100, instances=2, allowed_root=tmp_path)
    cfg = config_pbtxt("engines", opts)
    assert "max_batch_size: 4" in cfg and "max_queue_delay_microseconds: 100" in cfg
    assert "instance_group [ { count: 2 kind: KIND_CPU } ]" in cfg
    assert f'string_value: "{tmp_path.resolve()}"' in cfg
    repo = write_repository(tmp_path / "repo", assets().engines, opts)
    assert (repo / "hms" / "1" / "model.py").read_text().count("TritonPythonModel") == 1
    assert (repo / "launch.sh").stat().st_mode & 0o111
    with pytest.raises(ConfigError, match="not empty"):
        write_repository(tmp_path / "repo", assets().engines, opts)
    with pytest.raises(ConfigError, match="max_batch must be >= 1"):
        RepositoryOptions(max_batch=0).check()
    with pytest.raises(ConfigError, match="not found"):
        write_repository(tmp_path / "r2", tmp_path / "missing")


def _pbtxt_parameters(text: str) -> dict[str, str]:
    """The ``parameters`` of a config.pbtxt, read as Triton hands them to the model."""
    import re

    return {k: json.loads(v) for k, v in
            re.findall(r'key: "(\w+)" value: \{ string_value: (".*?") \}', text)}


def test_the_model_reads_back_the_settings_the_repository_wrote(tmp_path):
    """config.pbtxt's parameters are written and read by one pair of methods: every
    setting the model uses comes back as it was given, and one left out is the default."""
    import dataclasses

    given = RepositoryOptions(engine="trt", device="cuda:1", allowed_root=tmp_path,
                              max_upload_bytes=1234, threads=3, run=RunSettings(topk=2, steps=12),
                              stop_file=tmp_path / "stop", upload_dir=tmp_path / "up")
    params = _pbtxt_parameters(config_pbtxt("engines", given))
    assert params["engines_dir"] == "engines"
    back = RepositoryOptions.from_params(params)
    # max_batch, max_queue_delay_us and instances are Triton's (outside parameters)
    assert back == dataclasses.replace(given, allowed_root=tmp_path.resolve())
    defaults = RepositoryOptions()
    assert RepositoryOptions.from_params(_pbtxt_parameters(config_pbtxt("e", defaults))) == defaults
    assert RepositoryOptions.from_params({}) == defaults


def test_launcher_binds_every_port_to_host_and_fixes_the_stub_env():
    pytest.importorskip("pytriton")
    cmd = server_command("repo", Endpoints("127.0.0.1", 1, 2, 3), Path("backends"))
    for flag in ("--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
                 "--metrics-address=127.0.0.1", "--http-port=1", "--grpc-port=2",
                 "--metrics-port=3"):
        assert flag in cmd
    env = server_env({"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/x"})
    libs = env["LD_LIBRARY_PATH"].split(":")
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        assert libs[0] == sysconfig.get_config_var("LIBDIR")
    assert libs[-1] == "/x" and any(p.endswith("nvidia_pytriton.libs") for p in libs)
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)


@pytest.mark.parametrize("args, match, code", [
    (["--http-port", "0"], "must be a TCP port", 2),  # usage errors exit 2 (cli/common.py)
    (["--grpc-port", "8000"], "must differ", 2),
    (["--drain-s", "30"], "--drain-s must be >= 0 and below", 2),
    (["--max-upload-mb", "0"], "--max-upload-mb must be > 0", 2),
    (["--engines", "/nonexistent/engines"], "not found", 2),
])
def test_hms_serve_bad_options_one_line(args, match, code):
    from hms_deploy.cli.serve import main

    r = CliRunner().invoke(main, ["--engines", str(assets().engines), *args])
    assert r.exit_code == code
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hms-serve: error: ") and match in lines[0]

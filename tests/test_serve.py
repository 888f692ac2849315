"""``hms-serve`` on the real Triton server (nvidia-pytriton's tritonserver), loopback only.

One module-scoped server answers the record, bad-request, concurrency and socket tests;
the SIGTERM test and the raw-``tritonserver``-on-an-exported-repository test start their
own. Every request loop is bounded; every server is stopped by its fixture.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")
pytest.importorskip("tritonclient.http")

import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from click.testing import CliRunner
from runtime_helpers import assets, one_torch_thread  # noqa: F401 - autouse fixture
from serve_helpers import (
    descendants,
    free_ports,
    hms_serve,
    inputs,
    is_loopback,
    listening,
    port_free,
    record,
)
from tritonclient.utils import InferenceServerException

from hms_deploy.cli.run import main as hms_run

UPLOAD_LIMIT_MB = 1.0  # the sample videos are ~0.3 MB


def reference(video: Path, *extra: str) -> dict:
    """What ``hms-run --json`` prints for ``video``."""
    r = CliRunner().invoke(hms_run, [str(video), "--engines", str(assets().engines), "--json",
                                     *extra], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def assert_same(rec: dict, ref: dict) -> None:
    """Equal records up to timing/batch statistics; probabilities within 1e-5."""
    assert rec["decisions"] == ref["decisions"]
    assert rec["label"] == ref["label"]
    assert abs(rec["score"] - ref["score"]) <= 1e-5
    assert [k for k, _ in rec["topk"]] == [k for k, _ in ref["topk"]]
    for (_, p), (_, q) in zip(rec["topk"], ref["topk"]):
        assert abs(p - q) <= 1e-5
    for key in ("steps", "usage", "gflops", "has_audio", "engine", "device", "policy", "budget",
                "T", "export", "warnings", "fallback"):
        assert rec.get(key) == ref.get(key), key
    assert set(rec) >= set(ref) - {"checkpoint"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The server's --allowed-root: the sample videos, a symlink out of it, a non-video."""
    d = tmp_path_factory.mktemp("allowed")
    a = assets()
    (d / "sample.mp4").write_bytes(a.video.read_bytes())
    (d / "silent.mp4").write_bytes(a.silent.read_bytes())
    (d / "notes.txt").write_text("not a video\n")
    outside = tmp_path_factory.mktemp("outside") / "secret.mp4"
    outside.write_bytes(a.video.read_bytes())
    (d / "escape.mp4").symlink_to(outside)
    return d


@pytest.fixture(scope="module")
def server(root, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "hms-serve.log"
    with hms_serve(assets().engines, log, "--allowed-root", str(root), "--max-batch", "8",
                   "--max-queue-delay-us", "50000", "--max-upload-mb", str(UPLOAD_LIMIT_MB)) as s:
        yield s
    assert s.proc.returncode == 0, s.log_tail()


@pytest.fixture(scope="module")
def refs() -> dict[str, dict]:
    a = assets()
    return {
        "sample": reference(a.video),
        "silent": reference(a.silent),
        "sample_rates": reference(a.video, "--policy", "rates:0.6,0.3"),
        "sample_budget": reference(a.video, "--budget-gflops", "0.05"),
        "sample_dense": reference(a.video, "--policy", "dense"),
    }


# ---------------------------------------------------------------------------- records


def test_records_equal_hms_run_http_and_grpc(server, root, refs):
    h = thttp.InferenceServerClient(server.http_url)
    g = tgrpc.InferenceServerClient(server.grpc_url)
    video = root / "sample.mp4"
    # upload over HTTP, path over gRPC: the same record as hms-run
    r = h.infer("hms", inputs(thttp, video=video.read_bytes(), name="sample.mp4"))
    rec = record(r)
    assert_same(rec, refs["sample"])
    assert rec["video"] == "sample.mp4"
    assert r.as_numpy("label")[0, 0].decode() == rec["label"]
    assert abs(float(r.as_numpy("score")[0, 0]) - rec["score"]) < 1e-6
    rec = record(g.infer("hms", inputs(tgrpc, path="sample.mp4")))
    assert_same(rec, refs["sample"])
    assert rec["video"] == "sample.mp4"
    rec = record(g.infer("hms", inputs(tgrpc, path=str(root / "silent.mp4"))))
    assert_same(rec, refs["silent"])
    assert rec["has_audio"] is False
    # policy and budget travel with the request
    rec = record(h.infer("hms", inputs(thttp, path="sample.mp4", policy="rates:0.6,0.3")))
    assert_same(rec, refs["sample_rates"])
    rec = record(g.infer("hms", inputs(tgrpc, path="sample.mp4", budget_gflops=0.05)))
    assert_same(rec, refs["sample_budget"])
    assert rec["gflops"]["used"] <= 0.05


def test_concurrent_requests_share_a_lockstep_batch(server, refs):
    """Requests arriving together are stepped as one batch (stats.batch > 1), same records."""
    h = thttp.InferenceServerClient(server.http_url, concurrency=6)
    pending = [h.async_infer("hms", inputs(thttp, path="sample.mp4")) for _ in range(6)]
    recs = [record(p.get_result()) for p in pending]
    for rec in recs:
        assert_same(rec, refs["sample"])
    assert max(r["stats"]["batch"] for r in recs) > 1


# ----------------------------------------------------------------------- bad requests


def bad_requests(root: Path) -> dict[str, tuple[dict, str]]:
    """name -> (inputs, a fragment of the expected error line)."""
    data = (root / "sample.mp4").read_bytes()
    return {
        "non-video": ({"video": b"not a video\n" * 50, "name": "x.mp4"}, "not a readable media"),
        "empty": ({"video": b""}, "empty"),
        "truncated": ({"video": data[: len(data) // 20], "name": "t.mp4"}, "t.mp4"),
        "policy": ({"path": "sample.mp4", "policy": "sometimes"}, "unknown policy"),
        "missing": ({"policy": "dense"}, "missing input"),
        "dotdot": ({"path": "../outside/secret.mp4"}, "'..'"),
        "absolute-outside": ({"path": "/etc/passwd"}, "outside the allowed root"),
        "symlink-out": ({"path": "escape.mp4"}, "outside the allowed root"),
        "not-a-file": ({"path": "nope.mp4"}, "not a file"),
        "text-file": ({"path": "notes.txt"}, "notes.txt"),
        "oversized": ({"video": os.urandom(int(UPLOAD_LIMIT_MB * 2**20) + 1)}, "exceeds"),
        "both": ({"video": data, "path": "sample.mp4"}, "not both"),
    }


def test_bad_requests_in_one_batch_fail_alone(server, root, refs):
    h = thttp.InferenceServerClient(server.http_url, concurrency=16)
    bad = bad_requests(root)
    pending = {}
    for name, (values, _) in bad.items():  # interleave good and bad in one dynamic batch
        pending[name] = h.async_infer("hms", inputs(thttp, **values))
        pending[f"good-{name}"] = h.async_infer("hms", inputs(thttp, path="sample.mp4"))
    for name, p in pending.items():
        if name.startswith("good-"):
            assert_same(record(p.get_result()), refs["sample"])
            continue
        with pytest.raises(InferenceServerException) as e:
            p.get_result()
        msg = e.value.message()
        assert bad[name][1] in msg, (name, msg)
        assert "\n" not in msg and "Traceback" not in msg, (name, msg)
        assert "/tmp/hms-serve-" not in msg  # uploads are named by the client's name, not ours
        assert e.value.status() in ("400", "StatusCode.INVALID_ARGUMENT"), (name, e.value.status())
    assert server.ready()
    assert server.proc.poll() is None


def test_eight_clients_four_requests_one_bad_in_five(server, root, refs):
    bad = list(bad_requests(root).values())
    results: dict[tuple[int, int], tuple[bool, object]] = {}

    def client(c: int) -> None:
        g = tgrpc.InferenceServerClient(server.grpc_url)
        for k in range(4):  # bounded: 4 requests per client
            n = c * 4 + k
            is_bad = n % 5 == 4
            values = bad[n % len(bad)][0] if is_bad else {"path": "sample.mp4"}
            try:
                results[(c, k)] = (is_bad, record(g.infer("hms", inputs(tgrpc, **values),
                                                          client_timeout=120)))
            except InferenceServerException as e:
                results[(c, k)] = (is_bad, e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 32
    n_bad = 0
    for is_bad, got in results.values():
        if is_bad:
            n_bad += 1
            assert isinstance(got, InferenceServerException) and "StatusCode.INVALID" in str(got.status())
        else:
            assert isinstance(got, dict), got
            assert_same(got, refs["sample"])
    assert n_bad == 6
    assert server.ready()
    g = tgrpc.InferenceServerClient(server.grpc_url)
    assert_same(record(g.infer("hms", inputs(tgrpc, path="sample.mp4"))), refs["sample"])


# --------------------------------------------------------------------------- security


def test_every_port_listens_on_loopback_only(server):
    tree = descendants(server.proc.pid)
    assert len(tree) >= 2  # hms-serve, tritonserver (and its backend stub)
    found = listening(tree)
    ports = {int(a.rsplit(":", 1)[1]) for a in found}
    assert {server.http, server.grpc, server.metrics} <= ports, found
    assert all(is_loopback(a) for a in found), found


def test_model_config_has_batching(server):
    cfg = thttp.InferenceServerClient(server.http_url).get_model_config("hms")
    assert cfg["max_batch_size"] == 8
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == 50000
    assert cfg["instance_group"][0]["kind"] == "KIND_CPU"
    assert {i["name"] for i in cfg["input"]} == {"video", "path", "policy", "budget_gflops", "name"}
    assert {o["name"] for o in cfg["output"]} == {"record", "label", "score"}


# ------------------------------------------------------------------ shutdown under load


def test_sigterm_during_load_loses_no_answered_request(tmp_path, root, refs):
    """SIGTERM with 4 clients busy: queued and running requests are answered (drain), later
    ones refused with one clear line; hms-serve exits 0 within 30 s and frees its ports."""
    done: list[tuple[float, float, object]] = []  # (sent, finished, record or exception)
    with hms_serve(assets().engines, tmp_path / "log", "--allowed-root", str(root),
                   "--drain-s", "3") as s:

        def client() -> None:
            h = thttp.InferenceServerClient(s.http_url, connection_timeout=60, network_timeout=60)
            try:
                for _ in range(30):  # bounded
                    sent = time.monotonic()
                    try:
                        got: object = record(h.infer("hms", inputs(thttp, path="sample.mp4")))
                    except Exception as e:  # noqa: BLE001 - refusals after SIGTERM are expected
                        got = e
                    done.append((sent, time.monotonic(), got))
                    if not isinstance(got, dict):
                        return  # refused: a client goes elsewhere
            finally:
                h.close()

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while sum(isinstance(g, dict) for *_, g in done) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        t_term = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        code = s.proc.wait(30)
        exited = time.monotonic() - t_term
        for t in threads:
            t.join(60)
    assert code == 0, s.log_tail()
    assert exited < 30
    answered = [(sent, fin) for sent, fin, g in done if isinstance(g, dict)]
    assert len(answered) >= 4
    assert any(fin > t_term for _, fin in answered)  # in flight at SIGTERM, then answered
    for sent, _, got in done:
        if isinstance(got, dict):  # every answer complete and right
            assert_same(got, refs["sample"])
        else:  # refused after SIGTERM, in one line: shutting down, or no new connections
            assert sent > t_term - 0.5, got
            assert "shutting down" in str(got) or isinstance(got, OSError), repr(got)
    for port in (s.http, s.grpc, s.metrics):
        assert port_free(port)


# ------------------------------------------------- a user's tritonserver on --triton-repo


def test_raw_tritonserver_on_exported_repository(tmp_path, refs):
    from hms_deploy.cli.export import main as hms_export

    repo = tmp_path / "repo"
    r = CliRunner().invoke(hms_export, ["--engines", str(assets().engines), "--triton-repo",
                                        str(repo)], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    cfg = (repo / "hms" / "config.pbtxt").read_text()
    for fragment in ('backend: "python"', "max_batch_size: 8", "dynamic_batching",
                     "instance_group", 'name: "video"', 'name: "record"'):
        assert fragment in cfg
    assert (repo / "hms" / "1" / "engines" / "manifest.json").is_file()  # self-contained
    http, grpc, metrics = free_ports(3)
    log = tmp_path / "tritonserver.log"
    with open(log, "wb") as f:  # launch.sh execs the real tritonserver binary (same pid)
        proc = subprocess.Popen([str(repo / "launch.sh"), "--http-port", str(http),
                                 "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        h = thttp.InferenceServerClient(f"127.0.0.1:{http}")
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(Exception):  # not up yet
                if h.is_model_ready("hms"):
                    break
            time.sleep(0.25)
        assert h.is_model_ready("hms"), log.read_text(errors="replace")[-3000:]
        assert Path(f"/proc/{proc.pid}/exe").resolve().name == "tritonserver"
        assert all(is_loopback(a) for a in listening(descendants(proc.pid)))
        rec = record(h.infer("hms", inputs(thttp, video=assets().video.read_bytes(),
                                          name="clip.mp4")))
        assert_same(rec, refs["sample"])
        with pytest.raises(InferenceServerException, match="disabled"):
            h.infer("hms", inputs(thttp, path="sample.mp4"))  # no allowed root in the repo
        h.close()  # Triton waits for open connections on SIGTERM
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0


# ---------------------------------------------------------------------------- metrics


def hms_metrics(server) -> dict[str, float]:
    """``hms_*`` samples of the metrics port: 'name{labels}' -> value."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("hms_"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_metrics_port_counts_the_records_of_the_same_requests(server, root):
    before = hms_metrics(server)
    h = thttp.InferenceServerClient(server.http_url)
    recs = [record(h.infer("hms", inputs(thttp, path=p, **kw))) for p, kw in
            (("sample.mp4", {}), ("silent.mp4", {}), ("sample.mp4", {"policy": "dense"}))]
    for values in ({"path": "nope.mp4"}, {"policy": "dense"}):
        with pytest.raises(InferenceServerException):
            h.infer("hms", inputs(thttp, **values))
    after = hms_metrics(server)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta('hms_requests_total{outcome="ok"}') == 3
    assert delta('hms_requests_total{outcome="bad"}') == 2
    assert delta('hms_requests_total{outcome="error"}') == 0
    assert delta("hms_videos_total") == 3
    assert delta("hms_steps_total") == sum(r["steps"] for r in recs)
    for m in ("appearance", "motion"):
        assert delta(f'hms_backbone_runs_total{{modality="{m}"}}') == sum(r["usage"][m] for r in recs)
    assert delta('hms_backbone_runs_total{modality="audio"}') == sum(
        r["stats"]["audio_steps"] for r in recs)
    assert delta("hms_gmac_total") == pytest.approx(sum(r["gflops"]["used"] for r in recs), rel=1e-6)
    assert delta("hms_gmac_dense_total") == pytest.approx(sum(r["gflops"]["dense"] for r in recs),
                                                          rel=1e-6)
    assert delta("hms_gmac_total") < delta("hms_gmac_dense_total")
    for stage in ("total", "decode", "motion"):
        assert delta(f'hms_stage_seconds_total{{stage="{stage}"}}') == pytest.approx(
            sum(r["timing_ms"][stage] for r in recs) / 1e3, rel=1e-4, abs=1e-6)

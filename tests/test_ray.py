"""``hms-run --ray`` / ``hms-extract --ray`` on a real local Ray instance (2 CPUs, loopback).

One module-scoped instance, started by the library's own ``ray_instance`` (the jobs below
reuse it): records equal the Session's, errors recorded and the job goes on, ``--output``
resume, an actor SIGKILLed mid-job, extraction equal to the single-process store, and no
port of the instance on a non-loopback address.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import video_features
from runtime_helpers import (  # noqa: F401 - one_torch_thread is an autouse fixture
    assets,
    make_videos,
    one_torch_thread,
    ordered,
)

pytest.importorskip("ray.data", reason="the [ray] extra is not installed")
psutil = pytest.importorskip("psutil")  # Ray vendors it (on sys.path once ray is imported)

from hms_deploy.runtime.ray_batch import classify_ray
from hms_deploy.runtime.ray_cluster import (
    LOOPBACK_ENV,
    RayLayout,
    map_rows,
    pool_size,
    ray_instance,
)
from hms_deploy.runtime.session import Session

POLICY = "rates:0.6,0.3"


@pytest.fixture(scope="module")
def ray_local():
    assets()  # build the tiny model and its export before Ray takes the cores
    # a stale cluster address (RAY_ADDRESS, or `ray start`'s /tmp/ray/ray_current_cluster)
    # must not be joined: the embedded default always starts its own instance
    saved = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = "127.0.0.1:1"
    try:
        with ray_instance(RayLayout(num_cpus=2)) as ray:
            yield ray
    finally:
        os.environ.pop("RAY_ADDRESS")
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


FILE_KEYS = ("settings", "source")  # what an --output line adds to a record


def _reference(videos: list[str], policy: str = POLICY) -> dict[str, dict]:
    with Session(engines_dir=assets().engines) as s:
        return {r["video"]: r for r in s.classify_many(videos, policy=policy)}


def _assert_same_record(got: dict, want: dict) -> None:
    assert set(got) == set(want), set(got) ^ set(want)
    if "error" in want:
        assert got == want
        return
    for k in ("video", "label", "decisions", "usage", "steps", "T", "policy", "has_audio",
              "gflops", "export", "engine", "device", "budget"):
        assert got[k] == want[k], k
    assert [t[0] for t in got["topk"]] == [t[0] for t in want["topk"]]
    np.testing.assert_allclose([t[1] for t in got["topk"]], [t[1] for t in want["topk"]],
                               rtol=0, atol=1e-5)
    assert set(got["timing_ms"]) == set(want["timing_ms"])


def test_records_equal_the_sessions_and_errors_do_not_stop_the_job(ray_local, tmp_path):
    vids = [str(p) for p in make_videos(tmp_path / "v", 5, corrupt=(1, 4))]
    vids.append(str(assets().silent))
    seen: list[int] = []
    recs = list(classify_ray(vids, engines_dir=assets().engines, policy=POLICY,
                             on_worker=lambda rec, info: seen.append(info["pid"])))
    assert sorted(r["video"] for r in recs) == sorted(vids)  # each once, in finishing order
    ref = _reference(vids)
    for r in recs:
        _assert_same_record(r, ref[r["video"]])
    assert sum("error" in r for r in recs) == 2
    assert os.getpid() not in seen and len(seen) == len(vids)  # all in actors
    # the default layout on 2 CPUs: 2 actors of 1 thread (how many got work depends on
    # which started first); 1 actor of 2 threads when asked
    assert pool_size(ray_local, RayLayout()) == 2
    assert pool_size(ray_local, RayLayout(threads_per_worker=2)) == 1


def test_bad_options_fail_before_any_video(ray_local):
    from hms_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="policy"):  # at the call, not at the first next()
        classify_ray([str(assets().video)], engines_dir=assets().engines, policy="sometimes")
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        classify_ray([str(assets().video)], engines_dir=assets().engines,
                     layout=RayLayout(workers=0))
    with pytest.raises(ConfigError, match="not found"):
        classify_ray([str(assets().video)], engines_dir=assets().root / "nowhere")


def test_cli_json_output_and_resume(ray_local, tmp_path, monkeypatch):
    from hms_deploy.cli.run import main

    monkeypatch.chdir(tmp_path)
    make_videos(tmp_path / "vids", 4, corrupt=(2,))
    out = tmp_path / "r.jsonl"
    args = ["vids", "--engines", str(assets().engines), "--ray", "--json", "--output", str(out),
            "--policy", POLICY, "--no-progress"]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 1, r.stderr  # one video failed
    assert "4 input(s): 3 classified, 1 failed" in r.stderr
    printed = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["video"] for x in printed) == sorted(x["video"] for x in written)
    assert sorted(x["video"] for x in written) == [f"vids/v{i:02d}.mp4" for i in range(4)]
    ref = _reference([f"vids/v{i:02d}.mp4" for i in range(4)])
    for x in printed:
        _assert_same_record(x, ref[x["video"]])
    for x in written:  # the file adds what it keys resume on (ResultsFile)
        _assert_same_record({k: v for k, v in x.items() if k not in FILE_KEYS}, ref[x["video"]])
    # the broken video is repaired; a plain hms-run (no --ray) resumes the same file: it
    # retries only that video, and the file keeps one current record per video
    (tmp_path / "vids" / "v02.mp4").write_bytes(assets().video.read_bytes())
    plain = [a for a in args if a != "--ray"]
    r2 = CliRunner().invoke(main, plain, catch_exceptions=False)
    assert r2.exit_code == 0, r2.stderr
    assert "3 video(s) already in" in r2.stderr
    assert [json.loads(x)["video"] for x in r2.stdout.splitlines() if x.startswith("{")] == [
        "vids/v02.mp4"]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["video"] for x in lines) == [f"vids/v{i:02d}.mp4" for i in range(4)]
    assert not any("error" in x for x in lines)
    # and the other way round: records of the plain run are done for --ray
    make_videos(tmp_path / "more", 1)
    r3 = CliRunner().invoke(main, [*args[:1], "more", *args[1:]], catch_exceptions=False)
    assert r3.exit_code == 0, r3.stderr
    assert "4 video(s) already in" in r3.stderr
    assert [json.loads(x)["video"] for x in r3.stdout.splitlines() if x.startswith("{")] == [
        "more/v00.mp4"]
    # other settings: the file refuses (exit 3), as for the plain run
    r4 = CliRunner().invoke(main, [*args, "--topk", "2"], catch_exceptions=False)
    assert r4.exit_code == 3, r4.stderr


def test_cli_no_audio_options_reach_the_actors(ray_local, tmp_path):
    """--no-audio-policy / --allow-truncated travel to the actors: a silent video's record
    under --ray equals the plain run's (and 'error' refuses it in both)."""
    from hms_deploy.cli.run import main

    silent = str(assets().silent)
    for policy, code in (("dense", 0), ("error", 1)):
        got = []
        for extra in (["--ray"], []):
            r = CliRunner().invoke(main, [silent, "--engines", str(assets().engines), "--json",
                                          "--policy", "learned", "--no-audio-policy", policy,
                                          "--allow-truncated", "--no-progress", *extra],
                                   catch_exceptions=False)
            assert r.exit_code == code, r.stderr
            got.append([json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")])
        (ray_rec,), (plain_rec,) = got
        if code:
            assert ray_rec == plain_rec and "error" in ray_rec
        else:
            _assert_same_record(ray_rec, plain_rec)
            assert ray_rec["fallback"] == plain_rec["fallback"] is not None
            assert ray_rec["warnings"] == plain_rec["warnings"]
            assert ray_rec["decisions"]["appearance"] == [1] * ray_rec["steps"]


# Ray Data's line when a column cannot be Arrow and is stored as pickled Python objects
PICKLED = "pickled python objects"
# values that differ between two runs of one video: wall times, the decoder's read-ahead
# counters (docs/record.md), and probabilities (compared to 1e-6 apart: the actor runs ONNX
# Runtime on 1 thread, the plain run on every core); their keys, order and types are still
# compared
RUN_DEPENDENT = {"timing_ms", "frames_walked", "frames_skipped", "score", "topk"}


def _pickle_warnings(ray) -> int:
    """How many times the instance's logs (Ray Data's and the workers') say a column
    was pickled."""
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return sum(f.read_text(errors="replace").count(PICKLED)
               for f in logs.rglob("*") if f.is_file() and f.suffix in (".log", ".err", ".out"))


def _masked(obj):
    if isinstance(obj, dict):
        return {k: (_type_only(v) if k in RUN_DEPENDENT else _masked(v)) for k, v in obj.items()}
    return obj


def _type_only(obj):
    if isinstance(obj, dict):
        return {k: _type_only(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_type_only(v) for v in obj]
    return type(obj).__name__


def test_cli_ray_records_are_the_plain_runs_key_for_key_and_nothing_is_pickled(
        ray_local, tmp_path, monkeypatch):
    """``--ray`` prints and stores the plain run's records: same keys in the same order,
    same values of the same types (a classified video and a failing one); the actors'
    columns are Arrow's own (no pickle fallback in the instance's logs, which do show one
    when an actor returns a record as a Python dict)."""
    from hms_deploy.cli.run import main

    monkeypatch.chdir(tmp_path)
    make_videos(tmp_path / "vids", 2, corrupt=(1,))
    before = _pickle_warnings(ray_local)
    runs = []
    for mode in ("--ray", None):
        out = tmp_path / f"{mode or 'plain'}.jsonl"
        r = CliRunner().invoke(main, ["vids", "--engines", str(assets().engines), "--json",
                                      "--output", str(out), "--policy", POLICY, "--no-progress",
                                      *([mode] if mode else [])], catch_exceptions=False)
        assert r.exit_code == 1, r.stderr  # one video failed
        printed = sorted(x for x in r.stdout.splitlines() if x.startswith("{"))
        runs.append((printed, sorted(out.read_text().splitlines())))
    assert _pickle_warnings(ray_local) == before
    (ray_printed, ray_stored), (plain_printed, plain_stored) = runs
    for got, want in zip(ray_printed + ray_stored, plain_printed + plain_stored, strict=True):
        g, w = json.loads(got), json.loads(want)
        assert g["video"] == w["video"]
        assert ordered(_masked(g)) == ordered(_masked(w)), g["video"]
        if "error" in w:
            assert got == want  # the same JSON line, byte for byte
        else:
            assert list(g["timing_ms"]) == list(w["timing_ms"])
            assert [t[0] for t in g["topk"]] == [t[0] for t in w["topk"]]
            np.testing.assert_allclose([g["score"]] + [t[1] for t in g["topk"]],
                                       [w["score"]] + [t[1] for t in w["topk"]], rtol=0, atol=1e-6)
    assert sum("error" in x for x in ray_printed) == 1

    # the check above can see a fallback: an actor returning the record as a dict is pickled
    record = json.loads(ray_printed[0])

    class AsDict:  # local: Ray ships it by value
        def __call__(self, batch):
            return {"index": batch["index"], "record": [record]}

    assert list(map_rows(ray_local, AsDict, [{"index": 0}], RayLayout(workers=1), {}))
    assert _pickle_warnings(ray_local) > before


def test_cli_rejects_ray_with_online(tmp_path):
    from hms_deploy.cli.run import main

    r = CliRunner().invoke(main, [str(assets().video), "--engines", str(assets().engines),
                                  "--ray", "--online"])
    assert r.exit_code == 2 and "--online" in r.stderr
    r = CliRunner().invoke(main, [str(assets().video), "--engines", str(assets().engines),
                                  "--ray", "--explain", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "--explain" in r.stderr
    r = CliRunner().invoke(main, [str(assets().video), "--engines", str(assets().engines),
                                  "--ray", "--workers", "0"])
    assert r.exit_code == 2 and "--workers" in r.output
    r = CliRunner().invoke(main, [str(assets().video), "--engines", str(assets().engines),
                                  "--ray-address", "127.0.0.1:1"])
    assert r.exit_code != 0 and "--ray-address needs --ray" in r.output


def test_actor_killed_mid_job_loses_and_duplicates_nothing(ray_local, tmp_path):
    """SIGKILL the actor that delivered the first record while it holds more videos (each
    actor is handed several rows at once, so the killed one holds queued videos)."""
    vids = [str(p) for p in make_videos(tmp_path / "v", 12)]
    out = tmp_path / "r.jsonl"
    killed: list[int] = []
    after: list[int] = []

    def on_worker(rec: dict, info: dict) -> None:
        pid = info["pid"]
        if not killed:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        else:
            after.append(pid)

    recs = list(classify_ray(vids, engines_dir=assets().engines, policy=POLICY,
                             on_worker=on_worker, output=out))
    assert killed and _gone(killed[0])
    # its queued videos were retried on a live actor (the other one, or the killed one's
    # restart: which depends on how fast the restart is); records it had finished before
    # the kill may still arrive after it
    assert set(after) - {killed[0]}, (killed, after)
    assert sorted(r["video"] for r in recs) == sorted(vids)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["video"] for x in lines) == sorted(vids)  # no loss, no duplicate
    assert not any("error" in x for x in lines)
    ref = _reference(vids)
    for x in lines:
        _assert_same_record({k: v for k, v in x.items() if k not in FILE_KEYS}, ref[x["video"]])


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_extract_ray_equals_single_process(ray_local, tmp_path):
    from hms_deploy.checkpoint import init_checkpoint, save_checkpoint
    from hms_deploy.cli.extract import main
    from hms_deploy.config import tiny_config
    from hms_deploy.data.features import open_store
    from hms_deploy.data.synthetic import DEFAULT_CLASSES, render_class_video

    labels = list(DEFAULT_CLASSES)
    rows = []
    for k, label in enumerate(labels[:3]):
        render_class_video(tmp_path / f"{label}.mp4", label, seed=1, index=k, duration_s=1.0,
                           fps=8, size=(64, 48))
        rows.append(f"{label}.mp4,{label}")
    (tmp_path / "bad.mp4").write_bytes(b"not a video\n")
    rows += ["bad.mp4," + labels[0], f"{labels[1]}.mp4x,{labels[1]}", f"{labels[2]}.mp4,nolabel"]
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    save_checkpoint(init_checkpoint(tiny_config(len(labels), steps=4), labels=labels),
                    tmp_path / "tiny.pt")

    def run(out: str, *extra: str):
        return CliRunner().invoke(main, ["--checkpoint", str(tmp_path / "tiny.pt"), "--list",
                                         str(tmp_path / "list.csv"), "--out", str(tmp_path / out),
                                         "--quiet", "--dtype", "float32", *extra],
                                  catch_exceptions=False)

    local, ray_run = run("local", "--workers", "0"), run("ray", "--ray")
    assert local.exit_code == ray_run.exit_code == 1  # the bad rows fail in both
    a, b = open_store(tmp_path / "local"), open_store(tmp_path / "ray")
    assert sorted(a.keys()) == sorted(b.keys()) == sorted(f"{x}.mp4" for x in labels[:3])
    assert a.meta.backbone_hash == b.meta.backbone_hash
    for key in sorted(a.keys()):
        fa, fb = video_features(a, key), video_features(b, key)
        for m in fa:
            np.testing.assert_array_equal(fa[m], fb[m], err_msg=f"{key} {m}")
        ra = a.records[a.keys().index(key)]
        rb = b.records[b.keys().index(key)]
        assert (ra.label, ra.label_index, ra.duration_s, ra.has_audio) == (
            rb.label, rb.label_index, rb.duration_s, rb.has_audio)
    ea = sorted((e["key"], e["error"]) for e in a.errors())
    eb = sorted((e["key"], e["error"]) for e in b.errors())
    assert ea == eb and len(ea) == 3
    again = run("ray", "--ray")
    assert "0 extracted, 3 already in the store" in again.stdout
    assert len(open_store(tmp_path / "ray")) == 3


def _listening(proc) -> list[tuple[str, int, str]]:
    out = []
    for c in proc.net_connections(kind="inet"):
        if c.type == 1 and c.status == psutil.CONN_LISTEN:  # TCP
            out.append((c.laddr.ip, c.laddr.port, "tcp"))
        elif c.type == 2 and not c.raddr:  # UDP bound, unconnected
            out.append((c.laddr.ip, c.laddr.port, "udp"))
    return out


def test_local_instance_listens_on_loopback_only(ray_local):
    """Every socket that the instance's processes listen on is 127.0.0.1 (or ::1).

    Runs after the jobs above, so the pool's worker processes exist too.
    """
    assert os.environ.get(LOOPBACK_ENV) == "0"
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    names = {p.name() for p in procs if p.is_running()}
    assert {"gcs_server", "raylet"} <= names, names
    found = []
    for p in procs:
        try:
            found += [(p.name(), *s) for s in _listening(p)]
            if any("dashboard/dashboard.py" in a for a in p.cmdline()):
                # include_dashboard=False still runs a minimal head process: no HTTP port
                assert _listening(p) == [], p.cmdline()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    assert len(found) >= 4, found  # GCS, raylet x2, driver, workers: the check is not vacuous
    assert 8265 not in {port for _, _, port, _ in found}  # no dashboard web UI
    for name, ip, port, kind in found:
        addr = ipaddress.ip_address(ip)
        addr = getattr(addr, "ipv4_mapped", None) or addr
        assert addr.is_loopback, f"{name} listens on {ip}:{port}/{kind}"
    print(sorted({(n, ip) for n, ip, _, _ in found}), file=sys.stderr)



def test_throughput_benchmark_smoke(ray_local, tmp_path):
    """``hms-bench --suite throughput`` end to end (tiny model; structure and the summary's
    arithmetic, never times)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import bench_throughput as bt

    a = assets()
    s = bt.smoke_settings(checkpoint=str(a.checkpoint), engines_dir=str(a.engines),
                          video=str(a.video), out=str(tmp_path / "out"),
                          work_dir=str(tmp_path / "work"), steps=8)
    out = bt.run(s, log=lambda _: None)
    saved = json.loads((tmp_path / "out" / f"{s.stem}.json").read_text())
    assert saved["summary"] == out["summary"]
    sm = out["summary"]
    assert set(out["hms"]) == {"sequential", "lockstep", "ray"} and set(out["dense"]) == {
        "sequential", "ray"}
    assert out["hms"]["ray"]["actors"] in (1, 2) and out["hms"]["ray"]["startup_s"] > 0
    dense_best = max(out["dense"].values(), key=lambda r: r["videos_per_s"])
    assert sm["dense_videos_per_s"] == dense_best["videos_per_s"]
    assert 0 < sm["gmac_ratio_hms_over_dense"] < 1
    ray_hms = out["hms"]["ray"]
    ratio = ray_hms["gmac_per_video"] / dense_best["gmac_per_video"]
    assert sm["gmac_ratio_hms_over_dense"] == pytest.approx(ratio, abs=1e-5)
    # the summary rounds to 4 decimals
    assert sm["throughput_over_flops_bound"] == pytest.approx(
        ray_hms["videos_per_s"] * ratio / dense_best["videos_per_s"], abs=1e-4)
    dense_cpu = min(r["cpu_s_per_video"] for r in out["dense"].values())
    assert sm["cpu_time_over_flops_bound"] == pytest.approx(
        ratio * dense_cpu / ray_hms["cpu_s_per_video"], abs=1e-4)
    assert out["hms"]["ray"]["cpu_s_per_video"] > 0
    assert out["provenance"]["versions"]["onnxruntime"] and out["provenance"]["date"]
    assert (tmp_path / "out" / f"{s.stem}.md").read_text().count("|") > 20

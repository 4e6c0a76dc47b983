"""`chatvla loadtest`: short, bounded runs against an in-process null-engine server (loopback only)."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from chatvla.cli.main import main as cli_main
from chatvla.client.loadtest import LoadTestConfig, LoadTestError, TargetError, check_target, run_loadtest
from chatvla.client.loadtest.runner import summary_lines, write_reports
from chatvla.client.loadtest.scrape import Snapshot, batch_histogram, batch_series, parse_metrics
from chatvla.client.loadtest.sources import load_recordings, synthetic_episodes
from chatvla.client.recording import EpisodeWriter
from chatvla.profiles import ARX_R5_BIMANUAL, FRANKA_JOINT


def write_episode(path, profile=FRANKA_JOINT, ticks=40, offset=0.0, images_every=2, instruction="pick the red block"):
    rng = np.random.default_rng(int(offset * 100))
    states = []
    with EpisodeWriter(path, profile, instruction=instruction, image_encoding="jpeg") as w:
        for k in range(ticks):
            state = (np.asarray(profile.home or np.zeros(profile.state_dim), np.float32) + offset + 0.001 * k)
            state = np.clip(state, np.asarray(profile.action_lower, np.float32),
                            np.asarray(profile.action_upper, np.float32))[: profile.state_dim]
            images = {c.name: rng.integers(0, 255, (48, 64, 3), np.uint8) for c in profile.cameras} \
                if k % images_every == 0 else {}
            w.append(tick=k, timestamp=k / profile.control_rate_hz, state=state, action=None, images=images)
            states.append(state)
    return np.stack(states)


def check_report_sane(r: dict) -> None:
    lat = r["latency_ms"]
    for key in ("client_rtt_ms", "server_queue_ms", "server_preprocess_ms", "server_reasoning_ms",
                "server_expert_ms", "server_total_ms"):
        d = lat[key]
        assert d["p50"] is not None and 0 <= d["p50"] <= d["p90"] <= d["p99"] <= d["max"], (key, d)
    assert lat["server_reasoning_ms"]["p50"] >= 2.0  # the engine's simulated reasoning time
    assert lat["client_rtt_ms"]["p50"] >= lat["server_total_ms"]["p50"] * 0.5
    t = r["totals"]
    assert t["chunks"] > 0 and t["observations_sent"] >= t["chunks"]
    assert 0 <= t["stall_ticks"] <= t["ticks"] and 0 <= t["stall_fraction"] <= 1
    assert r["throughput"]["chunks_per_s"] > 0
    assert r["errors_by_kind"] == {} and r["rejections"] == 0
    assert len(r["timeline"]["t_s"]) == len(r["timeline"]["chunks"]) == len(r["timeline"]["rtt_p50_ms"])
    assert sum(r["timeline"]["chunks"]) == len(r["timeline"]["points"]) or len(r["timeline"]["points"]) <= 4000


async def test_synthetic_run_with_metrics_and_reports(null_server, tmp_path):
    app = await null_server()
    config = LoadTestConfig(target=app.grpc_address, robots=3, duration_s=3.0, ramp_up_s=1.0, synthetic=True,
                            metrics_url=app.http_url + "/metrics", scrape_interval_s=0.5)
    r = await asyncio.to_thread(run_loadtest, config, progress=None)
    check_report_sane(r)
    assert r["source"]["kind"] == "synthetic" and r["robots"]["started"] == 3
    assert r["server"]["profile"] == "franka_joint" and r["server"]["engine"] == "null"
    sm = r["server_metrics"]
    assert sm["snapshots"] >= 2 and sm["batch_reasoning"]["mean"] >= 1 and sm["batch_expert"]["batches"] > 0
    assert sm["requests_by_outcome"].get("ok", 0) >= r["totals"]["chunks"]
    assert sm["active_sessions_max"] >= 1
    jp, hp = write_reports(r, tmp_path / "rep")
    assert json.loads(jp.read_text())["totals"]["chunks"] == r["totals"]["chunks"]
    page = hp.read_text()
    assert page.count("<svg") >= 3 and "Latency CDF" in page and "batch sizes" in page
    assert "<th></th>" not in page  # no empty header row (tests/client/loadtest/test_report.py has the details)
    counts = [sm["active_sessions_max"], sm["batch_reasoning"]["batches"], *sm["batch_reasoning"]["histogram"].values(),
              *sm["requests_by_outcome"].values(), *sm["queue_depth_max"].values()]
    assert all(type(c) is int for c in counts), counts  # counts are integers in the JSON report too
    assert any("client round trip" in line for line in summary_lines(r))
    assert "token" not in r["config"]


async def test_replays_recorded_episodes_at_their_rate(null_server, tmp_path):
    app = await null_server()
    states = [write_episode(tmp_path / f"ep{i}.chatvla", offset=0.1 * i) for i in range(2)]
    (tmp_path / "notes.txt").write_text("not an episode")
    config = LoadTestConfig(target=app.grpc_address, robots=2, duration_s=2.5, recordings=str(tmp_path),
                            metrics_url=app.http_url + "/metrics")
    r = await asyncio.to_thread(run_loadtest, config, progress=None)
    check_report_sane(r)
    assert r["source"] == {"kind": "recordings", "episodes": 2, "names": ["ep0.chatvla", "ep1.chatvla"],
                           "control_rate_hz": [FRANKA_JOINT.control_rate_hz]}
    # every state the server saw is a recorded one
    recorded = np.concatenate(states)
    seen = app.engine.states
    assert seen and all(np.isclose(recorded, s, atol=1e-6).all(axis=1).any() for s in seen)
    # ticks run at the recording's rate: 2 robots x 15 Hz x 2.5 s, give or take start-up
    assert r["totals"]["ticks"] <= 2 * FRANKA_JOINT.control_rate_hz * 2.5 + 4


async def test_observation_budget_bounds_the_run(null_server):
    app = await null_server()
    config = LoadTestConfig(target=app.grpc_address, robots=2, duration_s=30.0, synthetic=True, max_observations=4,
                            metrics_url=app.http_url + "/metrics")
    r = await asyncio.to_thread(run_loadtest, config, progress=None)
    assert r["totals"]["observations_sent"] <= 4


async def test_recordings_for_another_profile_are_refused(null_server, tmp_path):
    app = await null_server()
    write_episode(tmp_path / "arx.chatvla", profile=ARX_R5_BIMANUAL, ticks=5)
    config = LoadTestConfig(target=app.grpc_address, robots=1, duration_s=1.0, recordings=str(tmp_path))
    with pytest.raises(LoadTestError, match="arx_r5_bimanual"):
        await asyncio.to_thread(run_loadtest, config, progress=None)
    # --synthetic is the fallback when recordings are unusable
    fallback = LoadTestConfig(target=app.grpc_address, robots=1, duration_s=1.0, recordings=str(tmp_path),
                              synthetic=True)
    r = await asyncio.to_thread(run_loadtest, fallback, progress=None)
    assert r["source"]["kind"] == "synthetic"


async def test_cli_end_to_end(null_server, tmp_path, capsys):
    app = await null_server()
    out = tmp_path / "report"
    code = await asyncio.to_thread(cli_main, [
        "loadtest", "--synthetic", "--robots", "2", "--duration", "2", "--target", app.grpc_address,
        "--metrics-url", app.http_url + "/metrics", "--report-dir", str(out), "--quiet",
    ])
    assert code == 0
    assert (out / "report.json").exists() and (out / "report.html").exists()
    assert "client round trip" in capsys.readouterr().out


@pytest.mark.parametrize("target", ["10.0.0.5:50051", "192.168.1.2:50051", "8.8.8.8:443", "[2001:db8::1]:50051",
                                    "0.0.0.0:50051"])
def test_refuses_non_loopback_targets(target, capsys):
    with pytest.raises(TargetError, match="loopback"):
        check_target(target)
    code = cli_main(["loadtest", "--synthetic", "--robots", "1", "--duration", "1", "--target", target])
    assert code == 2 and "loopback" in capsys.readouterr().err
    code = cli_main(["loadtest", "--synthetic", "--target", "127.0.0.1:50051", "--metrics-url",
                     f"http://{target.rsplit(':', 1)[0].strip('[]')}:8080/metrics"])
    assert code == 2


@pytest.mark.parametrize("target", ["127.0.0.1:1", "localhost:50051", "[::1]:50051", "127.8.9.10:50051"])
def test_loopback_targets_are_accepted(target):
    host, port = check_target(target)
    assert port > 0 and host


@pytest.mark.parametrize(("argv", "needle"), [
    (["--robots", "0", "--synthetic"], "--robots"),
    (["--robots", "100000", "--synthetic"], "--robots"),
    (["--duration", "0", "--synthetic"], "--duration"),
    (["--duration", "99999", "--synthetic"], "--duration"),
    (["--duration", "5", "--ramp-up", "5", "--synthetic"], "--ramp-up"),
    ([], "--recordings"),
    (["--target", "nonsense", "--synthetic"], "HOST:PORT"),
])
def test_bounds_are_enforced(argv, needle, capsys):
    assert cli_main(["loadtest", *argv]) == 2
    assert needle in capsys.readouterr().err


def test_unreachable_server_is_a_clean_error(capsys):
    code = cli_main(["loadtest", "--synthetic", "--robots", "1", "--duration", "1", "--target", "127.0.0.1:1"])
    assert code == 1 and "cannot get the model" in capsys.readouterr().err


def test_synthetic_episodes_and_recording_loader(tmp_path):
    eps = synthetic_episodes(ARX_R5_BIMANUAL, count=2, seconds=1.0)
    assert len(eps) == 2 and eps[0].length == 20 and eps[0].cameras == ARX_R5_BIMANUAL.camera_names
    images, state = eps[0].observation(5)
    assert state.shape == (14,) and images["cam_top"].shape == (224, 224, 3) and images["cam_top"].dtype == np.uint8
    states = write_episode(tmp_path / "a.chatvla", ticks=7, images_every=3)
    (ep,) = load_recordings(tmp_path / "a.chatvla", FRANKA_JOINT)
    np.testing.assert_allclose(ep.states, states)
    imgs1, _ = ep.observation(1)  # carried forward from tick 0
    imgs0, _ = ep.observation(0)
    assert imgs1["front"].shape == (48, 64, 3)
    np.testing.assert_array_equal(imgs0["front"], imgs1["front"])


def test_metrics_parsing_and_batch_series():
    def page(count: float, total: float, b1: float, b2: float) -> str:
        return "\n".join([
            "# HELP chatvla_batch_size Observations per batch run by a stage.",
            f'chatvla_batch_size_bucket{{le="1.0",stage="reasoning"}} {b1}',
            f'chatvla_batch_size_bucket{{le="2.0",stage="reasoning"}} {b2}',
            f'chatvla_batch_size_bucket{{le="+Inf",stage="reasoning"}} {b2}',
            f'chatvla_batch_size_count{{stage="reasoning"}} {count}',
            f'chatvla_batch_size_sum{{stage="reasoning"}} {total}',
            'chatvla_rejected_total{reason="overload"} 2.0',
            "unrelated_metric 5",
        ])

    a = Snapshot(0.0, parse_metrics(page(1, 1, 1, 1)))
    b = Snapshot(1.0, parse_metrics(page(4, 7, 2, 4)))
    assert "unrelated_metric" not in a.metrics
    assert batch_series([a, b], "reasoning") == [(1.0, 2.0, 3.0)]
    assert batch_histogram([a, b], "reasoning") == {"1.0": 1.0, "2.0": 2.0, "+Inf": 0.0}

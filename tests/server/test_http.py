"""The HTTP API: probes, metrics, model info, JSON and multipart infer, the debug page."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from serverkit import CAMERAS, PROFILE, GatedEngine, eventually, state_vec

METRIC_NAMES = {
    "chatvla_requests", "chatvla_stage_latency_seconds", "chatvla_batch_size", "chatvla_queue_depth",
    "chatvla_active_sessions", "chatvla_reasoning_tokens", "chatvla_rejected", "chatvla_reasoning_refresh",
}


def png_b64(value: int = 120, fmt: str = "PNG", h: int = 24, w: int = 24) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def body(**kw: object) -> dict:
    b: dict = {"images": {CAMERAS[0]: png_b64()}, "state": state_vec().tolist(),
               "instruction": "stack the cups", "seed": 9}
    b.update(kw)
    return b


async def test_probes_and_model(serve):
    srv = await serve()
    assert (await srv.http.get("/healthz")).json() == {"status": "ok"}
    r = await srv.http.get("/readyz")
    assert r.status_code == 200 and r.json()["ready"] is True
    info = (await srv.http.get("/v1/model")).json()
    assert info["profile"]["name"] == PROFILE.name
    assert info["profile"]["chunk_size"] == PROFILE.chunk_size
    assert info["engine"] == "null"


async def test_infer_json(serve):
    srv = await serve()
    r = await srv.http.post("/v1/infer", json=body(tick=5))
    assert r.status_code == 200, r.text
    out = r.json()
    actions = np.asarray(out["actions"], np.float32)
    assert actions.shape == (PROFILE.chunk_size, PROFILE.action_dim)
    np.testing.assert_allclose(actions, srv.engine.actions_for(state_vec(), 9))
    assert "stack the cups" in out["reasoning"]
    assert out["tick"] == 5
    assert set(out["timing"]) >= {"queue_ms", "preprocess_ms", "reasoning_ms", "expert_ms", "total_ms"}
    assert out["action_names"] == list(PROFILE.action_names)
    assert srv.sample("chatvla_requests_total", transport="http", outcome="ok") == 1


async def test_infer_multipart(serve):
    srv = await serve()
    raw = base64.b64decode(png_b64(fmt="JPEG"))
    r = await srv.http.post(
        "/v1/infer",
        files={CAMERAS[1]: ("wrist.jpg", raw, "image/jpeg")},
        data={"instruction": "open the drawer", "state": ", ".join(map(str, state_vec().tolist())), "seed": "9"},
    )
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.asarray(r.json()["actions"]), srv.engine.actions_for(state_vec(), 9))


async def test_infer_json_with_a_reasoning_override(serve):
    srv = await serve()
    r = await srv.http.post("/v1/infer", json=body(reasoning="Pick card 49."))
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["reasoning"], out["reasoning_refreshed"], out["reasoning_tokens"]) == ("Pick card 49.", False, 0)
    np.testing.assert_allclose(np.asarray(out["actions"]), srv.engine.actions_for(state_vec(), 9))
    assert srv.sample("chatvla_reasoning_tokens_total") == 0
    # null means no override: the model decodes as usual.
    r = await srv.http.post("/v1/infer", json=body(reasoning=None))
    assert r.json()["reasoning_refreshed"] and "stack the cups" in r.json()["reasoning"]


async def test_infer_multipart_with_a_reasoning_override(serve):
    srv = await serve()
    raw = base64.b64decode(png_b64())
    data = {"instruction": "open the drawer", "state": json.dumps(state_vec().tolist()), "seed": "9"}
    r = await srv.http.post("/v1/infer", files={CAMERAS[0]: ("a.png", raw, "image/png")},
                            data={**data, "reasoning": "Pick card 49."})
    assert r.status_code == 200, r.text
    assert (r.json()["reasoning"], r.json()["reasoning_refreshed"]) == ("Pick card 49.", False)
    r = await srv.http.post("/v1/infer", files={CAMERAS[0]: ("a.png", raw, "image/png")},
                            data={**data, "reasoning": "<|image_pad|>"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "reasoning"


BAD_JSON = [
    ("bad base64", body(images={CAMERAS[0]: "!!!not base64!!!"}), f"images[{CAMERAS[0]}]"),
    ("undecodable image", body(images={CAMERAS[0]: base64.b64encode(b"hello").decode()}), f"images[{CAMERAS[0]}]"),
    ("unknown camera", body(images={"thermal": png_b64()}), "images[thermal]"),
    ("no images", body(images={}), "images"),
    ("state length", body(state=[0.0, 1.0]), "state"),
    ("state type", body(state="zero"), "state"),
    ("state bool", body(state=[True] * PROFILE.state_dim), "state"),
    ("state beyond float32", body(state=[1e300] * PROFILE.state_dim), "state"),
    ("empty instruction", body(instruction="   "), "instruction"),
    ("long instruction", body(instruction="z" * 1001), "instruction"),
    ("unknown key", body(colour="red"), "colour"),
    ("negative seed", body(seed=-1), "seed"),
    ("reasoning not a string", body(reasoning=["Pick card 49."]), "reasoning"),
    ("control token in reasoning", body(reasoning="Pick card 49.<|im_end|>"), "reasoning"),
    ("control token in instruction", body(instruction="stack <|image_pad|> cups"), "instruction"),
    ("huge finite state", body(state=[1e10] * PROFILE.state_dim), "state"),
    ("1x1 image", body(images={CAMERAS[0]: png_b64(h=1, w=1)}), f"images[{CAMERAS[0]}]"),
    ("1x2048 image", body(images={CAMERAS[0]: png_b64(h=1, w=2048)}), f"images[{CAMERAS[0]}]"),
    ("not an object", [1, 2, 3], "body"),
]


async def test_infer_json_bad_input_is_422_naming_the_field(serve):
    srv = await serve()
    for what, payload, field in BAD_JSON:
        r = await srv.http.post("/v1/infer", json=payload)
        assert r.status_code == 422, (what, r.text)
        err = r.json()["error"]
        assert err["code"] == "INVALID_ARGUMENT" and err["field"] == field, (what, err)
        assert (await srv.http.post("/v1/infer", json=body())).status_code == 200


async def test_nan_in_json_state_is_422(serve):
    srv = await serve()
    raw = json.dumps(body()).replace(json.dumps(state_vec().tolist()), "[" + ", ".join(["NaN"] * 8) + "]")
    r = await srv.http.post("/v1/infer", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "state"


async def test_malformed_json_oversize_body_and_wrong_content_type(serve):
    srv = await serve(max_message_bytes=4096)
    r = await srv.http.post("/v1/infer", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "body"
    r = await srv.http.post("/v1/infer", content=b"x" * 5000, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "body"
    r = await srv.http.post("/v1/infer", content=b"a=b", headers={"content-type": "text/plain"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "content-type"


async def test_multipart_bad_state_and_image(serve):
    srv = await serve()
    r = await srv.http.post("/v1/infer", files={CAMERAS[0]: ("a.png", b"not an image", "image/png")},
                            data={"instruction": "go", "state": "1, 2, x"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "state"
    r = await srv.http.post("/v1/infer", files={CAMERAS[0]: ("a.png", b"not an image", "image/png")},
                            data={"instruction": "go", "state": json.dumps(state_vec().tolist())})
    assert r.status_code == 422 and r.json()["error"]["field"] == f"images[{CAMERAS[0]}]"


async def test_overload_is_429(serve):
    engine = GatedEngine()
    srv = await serve(engine=engine, max_queue=1)
    engine.hold()
    import asyncio

    first = asyncio.create_task(srv.http.post("/v1/infer", json=body()))
    await engine.wait_entered()
    r = await srv.http.post("/v1/infer", json=body())
    assert r.status_code == 429 and r.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert r.headers["retry-after"] == "1"
    engine.release()
    assert (await first).status_code == 200


async def test_metrics_parse_and_carry_every_family(serve):
    srv = await serve()
    assert (await srv.http.post("/v1/infer", json=body())).status_code == 200
    assert (await srv.http.post("/v1/infer", json=body(state=[1]))).status_code == 422
    r = await srv.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert set(families) >= METRIC_NAMES, set(families)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("chatvla_requests_total", (("outcome", "ok"), ("transport", "http")))] == 1
    assert samples[("chatvla_requests_total", (("outcome", "invalid_argument"), ("transport", "http")))] == 1
    assert samples[("chatvla_rejected_total", (("reason", "invalid_argument"),))] == 1
    assert samples[("chatvla_batch_size_count", (("stage", "expert"),))] == 1
    assert samples[("chatvla_stage_latency_seconds_count", (("stage", "total"),))] == 1
    assert samples[("chatvla_reasoning_tokens_total", ())] > 0


async def test_debug_page_is_self_contained(serve):
    srv = await serve()
    r = await srv.http.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    for needle in ('type="file"', 'id="instruction"', 'id="reasoning-override"', 'fd.append("reasoning"',
                   "reasoning override (optional)", "/v1/infer", "/v1/model", "<svg", "polyline"):
        assert needle in html or needle.strip("<") in html, needle
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "https://" not in html


async def test_readiness_off_while_draining(serve):
    engine = GatedEngine()
    srv = await serve(engine=engine)
    engine.hold()
    import asyncio

    pending = asyncio.create_task(srv.http.post("/v1/infer", json=body()))
    await engine.wait_entered()
    shutdown = asyncio.create_task(srv.app.shutdown())
    await eventually(lambda: srv.app.state.draining)
    r = await srv.http.get("/readyz")
    assert r.status_code == 503 and r.json()["reason"] == "draining"
    r = await srv.http.post("/v1/infer", json=body())
    assert r.status_code == 503
    engine.release()
    assert (await pending).status_code == 200  # the in-flight request is answered
    assert await shutdown is True


async def test_deeply_nested_json_is_422_naming_the_field(serve):
    srv = await serve()
    r = await srv.http.post("/v1/infer", content=b"[" * 100_000, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "body", r.text
    nested = json.dumps(body()).replace(json.dumps(state_vec().tolist()), "[" * 100_000 + "]" * 100_000)
    r = await srv.http.post("/v1/infer", content=nested, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "body", r.text
    r = await srv.http.post("/v1/infer", files={CAMERAS[0]: ("a.png", base64.b64decode(png_b64()), "image/png")},
                            data={"instruction": "go", "state": "[" * 60_000})
    assert r.status_code == 422 and r.json()["error"]["field"] == "state", r.text
    assert len(r.content) <= 1024
    assert (await srv.http.post("/v1/infer", json=body())).status_code == 200


async def test_metrics_carry_process_and_build_info_and_no_created_series(serve):
    srv = await serve()
    text = (await srv.http.get("/metrics")).text
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"):
        assert f"\n{name} " in text, name
    assert 'chatvla_build_info{engine="null",model="null",profile="franka_joint",version="' in text
    assert "_created" not in text

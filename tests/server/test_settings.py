"""Settings precedence (flags > env > YAML > defaults), validation messages, and the CLI flags."""

from __future__ import annotations

import argparse

import pytest

from chatvla.cli import serve as serve_cli
from chatvla.server.app import scheduler_config
from chatvla.server.settings import ServerSettings, SettingsError, load_settings, reference_markdown
from chatvla.wire.limits import DEFAULT_LIMITS


def test_defaults_match_the_contract():
    s = load_settings({}, env={})
    assert (s.model, s.engine, s.host, s.grpc_port, s.http_port) == (
        "chatvla-tiny-mm", "torch", "127.0.0.1", 50051, 8080)
    assert s.http_host == "127.0.0.1" and s.http_is_loopback
    assert s.limits == DEFAULT_LIMITS
    assert s.tokens_file is None and not s.tls


def test_precedence_flags_over_env_over_yaml(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("max-batch: 4\nmax_wait_ms: 9\nengine: null\nengine_options: {reason_ms: 3}\nhttp_port: 1\n")
    env = {"CHATVLA_MAX_BATCH": "6", "CHATVLA_HTTP_PORT": "2", "CHATVLA_CONFIG": str(cfg)}
    s = load_settings({"http_port": 3, "grpc_port": None}, env=env)
    assert (s.max_batch, s.max_wait_ms, s.engine, s.http_port) == (6, 9.0, "null", 3)
    assert s.engine_options == {"reason_ms": 3}
    assert s.grpc_port == 50051  # None flags do not override
    s = load_settings({}, env={"CHATVLA_ENGINE_OPTIONS": "{profile: arx_r5_bimanual}", "CHATVLA_WARMUP": "false"})
    assert s.engine_options == {"profile": "arx_r5_bimanual"} and s.warmup is False


@pytest.mark.parametrize(("flags", "env", "needle"), [
    ({"max_batch": 0}, {}, "--max-batch"),
    ({}, {"CHATVLA_GRPC_PORT": "http"}, "CHATVLA_GRPC_PORT"),
    ({"engine": "tensorflow"}, {}, "--engine"),
    ({"tls_cert": "c.pem"}, {}, "tls_key"),
    ({"bogus": 1}, {}, "bogus"),
])
def test_bad_settings_name_their_source(flags, env, needle):
    with pytest.raises(SettingsError, match=needle):
        load_settings(flags, env=env)


def test_bad_yaml_is_a_settings_error(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("- a\n- b\n")
    with pytest.raises(SettingsError, match="mapping"):
        load_settings({}, env={}, config_file=cfg)


def test_expert_stage_defaults_follow_reasoning_stage():
    c = scheduler_config(ServerSettings(max_batch=5, max_wait_ms=7)).compute
    assert (c.expert_max_batch, c.expert_max_wait_s) == (5, 0.007)
    c = scheduler_config(ServerSettings(max_batch=5, expert_max_batch=2, expert_max_wait_ms=0)).compute
    assert (c.expert_max_batch, c.expert_max_wait_s) == (2, 0.0)


def test_cli_has_a_flag_for_every_setting():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    serve_cli.register(sub)
    args = parser.parse_args(["serve", "--engine", "null", "--http-port", "0", "--engine-option", "reason_ms=2.5",
                              "--engine-option", "profile=franka_ee", "--no-warmup", "--max-batch", "3"])
    flags = {k: getattr(args, k) for k in ServerSettings.model_fields}
    flags["engine_options"] = dict(flags["engine_options"])
    s = load_settings(flags, env={})
    assert s.engine_options == {"reason_ms": 2.5, "profile": "franka_ee"}
    assert (s.engine, s.http_port, s.warmup, s.max_batch) == ("null", 0, False, 3)
    table = reference_markdown()
    for name in ServerSettings.model_fields:
        assert f"`{name}`" in table

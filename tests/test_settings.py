"""Server configuration: validation, the live-retunable part, and the committed Serve config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serving.cli import build_parser
from serving.serve_flags import FLAGS, serve_configs
from serving.settings import AppConfig, DeploymentOptions, LaunchConfig, ServeSettings, Tuning

SERVE_YAML = Path(__file__).parents[1] / "deploy" / "serve.yaml"


def test_defaults_bind_loopback_and_batch_within_the_replica_limit():
    launch = LaunchConfig()
    assert launch.host == "127.0.0.1" and launch.address is None
    app = AppConfig(bundles=["b"])
    assert app.direct_grpc_port is None and app.direct_host == "127.0.0.1"
    assert DeploymentOptions().max_ongoing_requests >= app.max_batch_size
    assert app.tuning() == Tuning(bundles=["b"])


def test_serve_knobs_live_only_in_the_deployment_options():
    """Replicas, CPUs and queue bounds are Serve's: the app's args cannot carry a second copy,
    and the options are exactly ``Deployment.options`` keywords."""
    for name in ("replicas", "num_replicas", "num_cpus", "max_ongoing_requests"):
        with pytest.raises(ValidationError, match="Extra inputs"):
            AppConfig.model_validate({"bundles": ["b"], name: 1})
    options = DeploymentOptions(num_replicas=3, num_cpus=0.5, retry_after_s=2)
    assert options.serve_options(num_gpus=1) == {
        "num_replicas": 3,
        "max_ongoing_requests": 256,
        "max_queued_requests": 256,
        "backpressure_config": {"retry_after_s": 2.0},
        "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1},
    }


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_batch_size": 5000}, "less than or equal to 4096"),
        ({"bundles": []}, "at least 1"),
        ({"device": "tpu"}, "cpu"),
        ({"max_direct_rpcs": 0}, "greater than or equal to 1"),
        ({"batch_wait_timeout_s": -1}, "greater than or equal to 0"),
        ({"max_batch": 3}, "Extra inputs"),
        ({"direct_grpc_port": 0}, "greater than or equal to 1"),
        ({"direct_grpc_port": 70000}, "less than or equal to 65535"),
    ],
)
def test_bad_app_configs_are_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        AppConfig.model_validate({"bundles": ["b"]} | fields)


def test_serve_flags_become_validated_configs():
    args = build_parser().parse_args(
        ["serve", "a", "b", "--http-port", "8100", "--batch-wait-ms", "5", "--max-body-mb", "2"]
    )
    app, deployment, launch = serve_configs(args)
    assert deployment == DeploymentOptions()
    assert app.bundles == ["a", "b"] and app.batch_wait_timeout_s == 0.005
    assert app.max_body_bytes == 2 << 20 and launch.http_port == 8100 and launch.grpc_port == 9000
    assert app.direct_grpc_port is None
    direct = ["serve", "a", "--direct-grpc-port", "9100", "--host", "0.0.0.0"]
    app, _, launch = serve_configs(build_parser().parse_args(direct))
    assert (app.direct_host, app.direct_grpc_port, launch.host) == ("0.0.0.0", 9100, "0.0.0.0")
    scaled = [
        "serve",
        "a",
        "--replicas",
        "2",
        "--replica-cpus",
        "0.5",
        "--max-queued-requests",
        "9",
    ]
    _, deployment, _ = serve_configs(build_parser().parse_args(scaled))
    assert deployment == DeploymentOptions(num_replicas=2, num_cpus=0.5, max_queued_requests=9)
    bad = build_parser().parse_args(["serve", "a", "--max-batch-size", "300"])
    with pytest.raises(ValueError, match=r"max_ongoing_requests \(256\) must be at least"):
        serve_configs(bad)


def _serve_help() -> dict[str, str]:
    """Each ``espro serve`` flag's help, as argparse holds it."""
    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    serve = sub.choices["serve"]
    return {option: a.help for a in serve._actions for option in a.option_strings}


@pytest.mark.parametrize(
    "flag",
    [
        "--address", "--host", "--http-port", "--grpc-port", "--metrics-port", "--ray-cpus",
        "--request-timeout-s", "--replicas", "--device", "--replica-cpus", "--max-batch-size",
        "--batch-wait-ms", "--max-body-mb", "--max-ongoing-requests", "--max-queued-requests",
        "--max-fresh-draws", "--allow-custom-architecture", "--auth-token-file", "--engine",
        "--direct-grpc-port",
    ],
)  # fmt: skip
def test_serve_flags_keep_their_names(flag):
    assert flag in _serve_help()


def test_serve_flags_carry_the_settings_docstrings_and_defaults():
    helps = _serve_help()
    fields = {(model, name) for flag in FLAGS.values() for model, name in flag.fields}
    models = (AppConfig, DeploymentOptions, LaunchConfig)
    every = {(m, n) for m in models for n in m.model_fields} - {(AppConfig, "bundles")}
    assert fields == every  # the bundles are the positional arguments
    for flag in FLAGS.values():
        model, name = flag.fields[0]
        first_words = " ".join(model.model_fields[name].description.split()[:3])
        assert helps[flag.name].startswith(first_words.replace("``", "")), flag.name
    assert helps["--max-batch-size"] == (
        "The most requests one engine run takes together. (default: 32)"
    )
    assert helps["--batch-wait-ms"].endswith("(0: never wait). (default: 2)")  # 0.002 s
    assert "(default: 64)" in helps["--max-body-mb"]  # MiB
    assert "(default: auto)" in helps["--engine"]
    assert helps["--replica-cpus"] == "CPUs reserved per replica. (default: 1)"
    assert helps["--ray-cpus"] == "CPUs of a Ray started here (default: every core)."


def test_serve_flags_at_their_defaults_give_the_default_configs():
    """Each default the help shows, given as the flag, is the field's default again: the unit
    conversions go both ways."""
    argv = ["serve", "b"]
    for flag in FLAGS.values():
        if flag.info.get_default() not in (None, False):
            *_, shown = re.findall(r"\(default: ([^)]+)\)", _serve_help()[flag.name])
            argv += [flag.name, shown]
    settings = serve_configs(build_parser().parse_args(argv))
    assert settings == ServeSettings(AppConfig(bundles=["b"]), DeploymentOptions(), LaunchConfig())


def test_the_committed_serve_config_is_a_valid_app(tiny_bundle_dir):
    from ray.serve.schema import ServeDeploySchema

    from serving.app import build_app
    from serving.launch import GRPC_SERVICER

    config = yaml.safe_load(SERVE_YAML.read_text())
    ServeDeploySchema.model_validate(config)
    assert config["grpc_options"]["grpc_servicer_functions"] == [GRPC_SERVICER]
    assert config["http_options"]["host"] == "127.0.0.1"
    (app,) = config["applications"]
    assert app["import_path"] == "serving.app:build_app"
    args = AppConfig.model_validate(app["args"] | {"bundles": [str(tiny_bundle_dir)]})
    (override,) = app["deployments"]
    defaults = DeploymentOptions()
    assert override == {"name": "espro", **defaults.serve_options(num_gpus=0)}
    deployment = build_app(args)._bound_deployment
    assert deployment.name == "espro"
    assert deployment._deployment_config.user_config == args.tuning().model_dump()
    assert deployment._deployment_config.max_queued_requests == defaults.max_queued_requests
    assert deployment.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0}
    assert deployment.init_args == (args, "cpu")
    direct = build_app(args.model_copy(update={"direct_grpc_port": 9100}))._bound_deployment
    assert direct.init_args[0].direct_grpc_port == 9100


def test_cuda_replicas_ask_ray_for_a_gpu():
    from serving.app import build_app

    deployment = build_app({"bundles": ["b"], "device": "cuda"})._bound_deployment
    assert deployment.ray_actor_options["num_gpus"] == 1


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "espro.example"])
def test_a_host_beyond_loopback_needs_ray_token_authentication(host, monkeypatch):
    """Beyond loopback only Ray's token keeps strangers from each replica's internal gRPC
    server, so switching it off there is refused; loopback stays allowed."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ValidationError, match="beyond loopback while RAY_AUTH_MODE=disabled"):
        LaunchConfig(host=host)
    for loopback in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        LaunchConfig(host=loopback)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert LaunchConfig(host=host).host == host


def test_a_local_ray_gets_a_fresh_token_unless_the_environment_chooses(monkeypatch):
    from serving.cluster import AUTH_VARIABLES, local_auth_environment

    for name in AUTH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    first, second = local_auth_environment(), local_auth_environment()
    assert set(first) == {"RAY_AUTH_TOKEN"} and len(first["RAY_AUTH_TOKEN"]) >= 32
    assert first != second
    for name, value in [("RAY_AUTH_MODE", "disabled"), ("RAY_AUTH_TOKEN_PATH", "/run/token")]:
        monkeypatch.setenv(name, value)
        assert local_auth_environment() == {}
        monkeypatch.delenv(name)

"""The shipped Serve config validates against Ray Serve's own schema and our app args."""

from __future__ import annotations

import hmac
import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from serving.app import AppArgs, _token_mac, app, deployment_options
from serving.config import ServeSettings

CONFIG = Path(__file__).resolve().parents[2] / "serving" / "serve_config.yaml"


def test_serve_config_validates_against_serve_schema() -> None:
    document = yaml.safe_load(CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(document)
    (application,) = schema.applications
    assert application.import_path == "serving.app:app"
    args = AppArgs.model_validate(application.args)
    assert args.serve.max_replicas >= args.serve.min_replicas


def test_deployment_options_carry_backpressure_and_autoscaling() -> None:
    options = deployment_options(
        ServeSettings(min_replicas=2, max_replicas=5, max_queued_requests=7, num_gpus=0.5)
    )
    assert options["autoscaling_config"]["min_replicas"] == 2
    assert options["autoscaling_config"]["max_replicas"] == 5
    assert options["max_queued_requests"] == 7
    assert options["backpressure_config"] == {"status_code": 503, "retry_after_s": 1}
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}


def test_a_fixed_replica_count_is_deployed_without_autoscaling() -> None:
    options = deployment_options(ServeSettings(min_replicas=3, max_replicas=3))
    assert options["num_replicas"] == 3
    assert "autoscaling_config" not in options
    assert options["logging_config"] == {"enable_access_log": False}


TOKEN = "s3cret-token-" + "x" * 20


def test_http_token_is_a_secret_never_shown_and_never_sent_to_replicas() -> None:
    settings = ServeSettings(http_token=TOKEN, max_ongoing_requests=8)
    assert TOKEN not in repr(settings) and TOKEN not in str(settings)
    assert TOKEN not in json.dumps(settings.model_dump(mode="json"))  # status --json
    deployment = app(
        {"artifact_dir": "models/fashion_mnist_optimized", "serve": settings.model_dump()}
    )
    user_config = deployment._bound_deployment._deployment_config.user_config
    assert TOKEN not in json.dumps(user_config)
    # Replicas get a salted HMAC of the token, which verifies the token and nothing else.
    salt, mac = user_config["http_token_salt"], user_config["http_token_hmac"]
    assert hmac.compare_digest(_token_mac(salt, TOKEN.encode()), mac)
    assert not hmac.compare_digest(_token_mac(salt, (TOKEN + "x").encode()), mac)
    assert user_config["http_max_ongoing_requests"] == 4  # half the slots; the rest: handles
    assert user_config["http_docs"] is False


def test_a_short_token_is_refused_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="http_token") as excinfo:
        ServeSettings(http_token="hunter2-short")
    assert "hunter2" not in str(excinfo.value)
    monkeypatch.setenv("FRAMECAST_SERVE_HTTP_TOKEN", TOKEN)
    assert ServeSettings().http_token is not None
    assert ServeSettings().http_token.get_secret_value() == TOKEN  # type: ignore[union-attr]


def test_http_concurrency_leaves_slots_to_handle_calls() -> None:
    assert ServeSettings(max_ongoing_requests=8).http_concurrency == 4
    assert ServeSettings(max_ongoing_requests=1).http_concurrency == 1
    assert ServeSettings(max_ongoing_requests=8, http_max_ongoing_requests=6).http_concurrency == 6
    with pytest.raises(ValidationError, match="http_max_ongoing_requests"):
        ServeSettings(max_ongoing_requests=4, http_max_ongoing_requests=5)

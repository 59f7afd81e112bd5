"""The shipped Serve config validates against Ray Serve's own schema and our app args."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from serving.app import AppArgs, deployment_options
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

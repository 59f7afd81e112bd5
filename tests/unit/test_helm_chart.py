"""The Helm chart, for real: helm lint + helm template for every values file, kubeconform
against the Kubernetes, KubeRay, KEDA and Prometheus-operator schemas, and policy checks over
the rendered YAML (the secure defaults: nothing of Ray exposed, token auth, no secret in values).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from cluster.cli import app
from cluster.k8s import tools as k8s

CHART = k8s.CHART
VARIANTS = ["values.yaml", *(p.name for p in k8s.values_files())]
RAY_PRIVATE_PORTS = {6379, 8265, 10001, 52365}
SENSITIVE = ("PASSWORD", "USERNAME", "TOKEN", "BOOTSTRAP", "SECRET")


@pytest.fixture(scope="module")
def built_tools() -> k8s.Tools:
    return k8s.ensure_tools()


def _files(variant: str) -> list[Path]:
    return [] if variant == "values.yaml" else [CHART / variant]


@pytest.fixture(scope="module")
def rendered(built_tools: k8s.Tools, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("rendered")
    paths = {}
    for variant in VARIANTS:
        path = out / f"{Path(variant).stem}.yaml"
        path.write_text(k8s.helm_template(built_tools, _files(variant)), encoding="utf-8")
        paths[variant] = path
    return paths


def _docs(rendered: dict[str, Path], variant: str) -> list[dict[str, Any]]:
    return k8s.documents(rendered[variant].read_text(encoding="utf-8"))


def _kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _pod_specs(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = doc.get("spec", {})
    if doc["kind"] == "Deployment":
        yield spec["template"]["spec"]
    cluster = {"RayService": "rayClusterConfig", "RayJob": "rayClusterSpec"}.get(doc["kind"])
    if cluster:
        ray = spec[cluster]
        yield ray["headGroupSpec"]["template"]["spec"]
        for group in ray["workerGroupSpecs"]:
            yield group["template"]["spec"]
    if doc["kind"] == "RayJob":
        yield spec["submitterPodTemplate"]["spec"]


def _ray_clusters(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = [d["spec"]["rayClusterConfig"] for d in _kind(docs, "RayService")]
    return out + [d["spec"]["rayClusterSpec"] for d in _kind(docs, "RayJob")]


# -- lint, render, validate -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_passes_strict(built_tools: k8s.Tools, variant: str):
    out = k8s.helm_lint(built_tools, (_files(variant) or [None])[0])
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_manifests_validate_against_kubernetes_and_crd_schemas(
    built_tools: k8s.Tools, rendered: dict[str, Path], variant: str
):
    report = k8s.kubeconform(built_tools, [rendered[variant]])
    docs = _docs(rendered, variant)
    assert report["summary"]["valid"] == len(docs) > 0
    assert {r["status"] for r in report["resources"]} == {"statusValid"}


def test_kubeconform_catches_a_broken_render(
    built_tools: k8s.Tools, rendered: dict[str, Path], tmp_path: Path
):
    docs = _docs(rendered, "values.yaml")
    deployment = _kind(docs, "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["exec"]["commandd"] = [
        "true"
    ]
    target = tmp_path / "broken.yaml"
    target.write_text(yaml.safe_dump_all(docs), encoding="utf-8")
    with pytest.raises(k8s.ToolError, match="commandd"):
        k8s.kubeconform(built_tools, [target])


# -- values.schema.json and template guards -------------------------------------------------------


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["kafka.sasl_password=hunter2"], "sasl_password"),
        (["ray.auth.token=abc"], "token"),
        (["ray.auth.mode=disabled"], "mode"),
        (["networkPolicy.enabled=false"], "networkPolicy"),
        (["kafka.securityProtocol=SASL_SSL"], "saslMechanism"),
        (["kafka.securityProtocol=TLS"], "securityProtocol"),
        (["autoscaling.mode=vpa"], "mode"),
        (["streamClassifier.guarantee=at-most-once"], "guarantee"),
        (["containerSecurityContext.allowPrivilegeEscalation=true"], "allowPrivilegeEscalation"),
        (["autoscaling.minReplicas=5", "autoscaling.maxReplicas=2"], "maxReplicas"),
        (["serve.numGpus=1"], "gpuWorkers"),
        (["ray.auth.existingSecret="], "existingSecret"),
        (["serve.enabled=false"], "serve.enabled"),
    ],
)
def test_bad_values_are_refused(built_tools: k8s.Tools, sets: list[str], message: str):
    with pytest.raises(k8s.ToolError, match=message):
        k8s.helm_template(built_tools, sets=sets)


# -- policies over every rendered variant ---------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_ray_port_is_reachable_from_outside_the_cluster(rendered: dict[str, Path], variant: str):
    docs = _docs(rendered, variant)
    assert not _kind(docs, "Ingress") and not _kind(docs, "Route")
    for service in _kind(docs, "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]
        ports = {p["port"] for p in service["spec"]["ports"]}
        assert not ports & RAY_PRIVATE_PORTS
    for cluster in _ray_clusters(docs):
        head = cluster["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP"
        for spec in [head["template"]["spec"]] + [
            g["template"]["spec"] for g in cluster["workerGroupSpecs"]
        ]:
            assert not spec.get("hostNetwork")
            for container in spec["containers"]:
                assert not any("hostPort" in p for p in container.get("ports", []))


@pytest.mark.parametrize("variant", VARIANTS)
def test_network_policy_admits_ray_ports_only_from_ray_and_the_operator(
    rendered: dict[str, Path], variant: str
):
    docs = _docs(rendered, variant)
    policies = {p["metadata"]["name"]: p for p in _kind(docs, "NetworkPolicy")}
    ray_policy = policies["framecast-ray"]
    assert ray_policy["spec"]["podSelector"]["matchLabels"]["framecast.io/ray"] == "true"
    for cluster in _ray_clusters(docs):
        for spec in [cluster["headGroupSpec"]["template"]] + [
            g["template"] for g in cluster["workerGroupSpecs"]
        ]:
            assert spec["metadata"]["labels"]["framecast.io/ray"] == "true"
    for rule in ray_policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        sources = rule["from"]
        if not ports:  # all ports: only Ray's own pods (and the release's RayJob submitter)
            for source in sources:
                labels = source["podSelector"]["matchLabels"]
                ray_pod = labels.get("framecast.io/ray") == "true"
                assert ray_pod or "batch.kubernetes.io/job-name" in labels
                assert "namespaceSelector" not in source
        elif ports & {8265, 52365}:
            (source,) = sources
            assert source["namespaceSelector"]["matchLabels"] == {
                "kubernetes.io/metadata.name": "kuberay-system"
            }
        elif 10001 in ports:  # Ray Client: only this release's stream classifiers
            (source,) = sources
            assert "namespaceSelector" not in source
            assert source["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == (
                "stream-classifier"
            )
            assert ports == {10001, 8000}
        else:
            assert ports <= {8000, 8080}
    if _kind(docs, "Deployment"):
        stream = policies["framecast-stream"]
        assert set(stream["spec"]["policyTypes"]) == {"Ingress", "Egress"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_ray_token_auth_is_on_everywhere(rendered: dict[str, Path], variant: str):
    docs = _docs(rendered, variant)
    clusters = _ray_clusters(docs)
    assert clusters
    for cluster in clusters:
        assert cluster["authOptions"]["mode"] == "token"


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_secret_in_values_or_manifests(rendered: dict[str, Path], variant: str):
    docs = _docs(rendered, variant)
    assert not _kind(docs, "Secret")
    assert not _kind(docs, "ConfigMap")
    for doc in docs:
        for pod in _pod_specs(doc):
            for container in pod["containers"]:
                for env in container.get("env", []):
                    if any(word in env["name"] for word in SENSITIVE):
                        assert "value" not in env, env
                        assert "secretKeyRef" in env["valueFrom"], env
    values = yaml.safe_load((CHART / variant).read_text(encoding="utf-8"))
    keys, scalars = _walk(values)
    assert not keys & FORBIDDEN_VALUE_KEYS
    assert not any("-----BEGIN" in str(v) for v in scalars)


FORBIDDEN_VALUE_KEYS = {
    "password",
    "sasl_password",
    "username",
    "sasl_username",
    "token",
    "auth_token",
    "ssl_password",
    "private_key",
}


def _walk(node: Any) -> tuple[set[str], list[Any]]:
    keys: set[str] = set()
    scalars: list[Any] = []
    if isinstance(node, dict):
        for key, value in node.items():
            keys.add(str(key).lower())
            more, values = _walk(value)
            keys |= more
            scalars += values
    elif isinstance(node, list):
        for value in node:
            more, values = _walk(value)
            keys |= more
            scalars += values
    else:
        scalars.append(node)
    return keys, scalars


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pod_is_non_root_and_bounded(rendered: dict[str, Path], variant: str):
    docs = _docs(rendered, variant)
    pods = [pod for doc in docs for pod in _pod_specs(doc)]
    assert pods
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["limits"]["memory"]


# -- the pieces, per values file ------------------------------------------------------------------


def _stream(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = _kind(docs, "Deployment")
    container: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def _cli_options(*path: str) -> set[str]:
    command: Any = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {opt for param in command.params for opt in param.opts}


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "values-train.yaml"])
def test_stream_classifier_runs_the_cli_with_probes_and_kafka_from_a_secret(
    rendered: dict[str, Path], variant: str
):
    docs = _docs(rendered, variant)
    container = _stream(docs)
    command = container["command"]
    assert command[:3] == ["framecast", "stream", "run"]
    flags = [c for c in command[3:] if c.startswith("--")]
    assert set(flags) <= _cli_options("stream", "run"), flags
    port = command[command.index("--metrics-port") + 1]
    for probe in ("livenessProbe", "readinessProbe"):
        assert f"127.0.0.1:{port}/metrics" in container[probe]["exec"]["command"][-1]
    env = {e["name"]: e for e in container["env"]}
    bootstrap = env["FRAMECAST_KAFKA_BOOTSTRAP_SERVERS"]["valueFrom"]["secretKeyRef"]
    assert bootstrap == {"name": "framecast-kafka", "key": "bootstrap_servers"}
    assert env["FRAMECAST_SERVE_HTTP_HOST"]["value"] == "framecast-serve-svc"
    # A token-authenticated Ray Client of the release's own Ray cluster (Serve handle calls).
    assert env["RAY_ADDRESS"]["value"] == "ray://framecast-head-svc:10001"
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    token = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    (cluster,) = [c for c in _ray_clusters(docs)]
    assert token == {"name": cluster["authOptions"]["secretName"], "key": "auth_token"}


def test_sasl_ssl_values_wire_credentials_and_ca_from_the_secret(rendered: dict[str, Path]):
    docs = _docs(rendered, "values-sasl.yaml")
    container = _stream(docs)
    env = {e["name"]: e for e in container["env"]}
    assert env["FRAMECAST_KAFKA_SECURITY_PROTOCOL"]["value"] == "SASL_SSL"
    assert env["FRAMECAST_KAFKA_SASL_MECHANISM"]["value"] == "SCRAM-SHA-512"
    for name, key in (("USERNAME", "sasl_username"), ("PASSWORD", "sasl_password")):
        ref = env[f"FRAMECAST_KAFKA_SASL_{name}"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "framecast-kafka", "key": key}
    cafile = env["FRAMECAST_KAFKA_SSL_CAFILE"]["value"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert cafile.startswith(mounts["kafka-tls"]["mountPath"])
    (auth,) = _kind(docs, "TriggerAuthentication")
    params = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(params) == {"username", "password", "ca"}
    (scaled,) = _kind(docs, "ScaledObject")
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["metadata"]["sasl"] == "scram_sha512"
    assert trigger["metadata"]["tls"] == "enable"
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    (cluster,) = _ray_clusters(docs)
    assert cluster["authOptions"]["secretName"] == "framecast-ray-token-prod"


def test_gpu_values_give_serve_a_gpu_worker_group_and_keda_on_lag(rendered: dict[str, Path]):
    docs = _docs(rendered, "values-gpu.yaml")
    (service,) = _kind(docs, "RayService")
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"gpu"}
    gpu = groups["gpu"]
    assert (gpu["minReplicas"], gpu["maxReplicas"]) == (1, 8)
    resources = gpu["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    assert gpu["template"]["spec"]["containers"][0]["image"].endswith("-gpu")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert config["applications"][0]["args"]["serve"]["num_gpus"] == 1
    (scaled,) = _kind(docs, "ScaledObject")
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == "framecast"
    assert trigger["metadata"]["bootstrapServersFromEnv"] == "FRAMECAST_KAFKA_BOOTSTRAP_SERVERS"
    assert (
        scaled["spec"]["scaleTargetRef"]["name"] == _kind(docs, "Deployment")[0]["metadata"]["name"]
    )
    assert not _kind(docs, "HorizontalPodAutoscaler")
    (monitor,) = _kind(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_cpu_values_scale_classifiers_on_cpu(rendered: dict[str, Path]):
    docs = _docs(rendered, "values-cpu.yaml")
    (hpa,) = _kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 65
    assert not _kind(docs, "ScaledObject")
    (deployment,) = _kind(docs, "Deployment")
    assert "replicas" not in deployment["spec"]  # the HPA owns the replica count
    assert "--deadline-ms" in _stream(docs)["command"]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "values-train.yaml"])
def test_serve_config_builds_the_serving_app(rendered: dict[str, Path], variant: str):
    from serving.app import AppArgs

    (service,) = _kind(_docs(rendered, variant), "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (application,) = config["applications"]
    assert application["import_path"] == "serving.app:app"
    args = AppArgs.model_validate(application["args"])
    assert args.serve.max_replicas >= args.serve.min_replicas


def test_train_values_add_a_rayjob_that_runs_framecast_train(rendered: dict[str, Path]):
    docs = _docs(rendered, "values-train.yaml")
    (job,) = _kind(docs, "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "cluster.cli", "train"]
    flags = [a for a in argv[4:] if a.startswith("--")]
    assert set(flags) <= _cli_options("train"), flags
    assert argv[argv.index("--out") + 1] == "/mnt/artifacts/optimized_cnn-v2"
    (service,) = _kind(docs, "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert config["applications"][0]["args"]["artifact_dir"] == "/mnt/artifacts/optimized_cnn-v2"
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert workers[0]["groupName"] == "gpu"
    assert (
        workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        == "1"
    )
    assert not _kind(docs, "Deployment")


@pytest.mark.parametrize("variant", ["values.yaml", "values-sasl.yaml"])
def test_the_classifier_env_is_understood_by_framecast_settings(
    rendered: dict[str, Path], variant: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    from cluster.settings import load_settings

    container = _stream(_docs(rendered, variant))
    for key in [k for k in os.environ if k.startswith(("FRAMECAST_", "RAY_"))]:
        monkeypatch.delenv(key)
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n", encoding="utf-8")
    secret = {
        "bootstrap_servers": "b-1:9096,b-2:9096",
        "sasl_username": "fc",
        "sasl_password": "pw",
        "auth_token": "tok",
    }
    for env in container["env"]:
        if "value" in env:
            value = env["value"]
        elif "secretKeyRef" in env["valueFrom"]:
            value = secret[env["valueFrom"]["secretKeyRef"]["key"]]
        else:
            value = "framecast-stream-abc12"  # fieldRef metadata.name
        if env["name"] == "FRAMECAST_KAFKA_SSL_CAFILE":
            value = str(ca)  # the mounted Secret file
        monkeypatch.setenv(env["name"], value)
    settings = load_settings()
    kafka = settings.kafka.client_config()
    assert kafka["bootstrap_servers"] == ["b-1:9096", "b-2:9096"]
    assert kafka["client_id"] == "framecast-stream-abc12"
    assert settings.ray.address == "ray://framecast-head-svc:10001"
    assert settings.serve.app_name == "framecast"
    if variant == "values-sasl.yaml":
        assert kafka["security_protocol"] == "SASL_SSL"
        assert kafka["sasl_mechanism"] == "SCRAM-SHA-512"
        assert kafka["sasl_plain_username"] == "fc"
        assert kafka["sasl_plain_password"] == "pw"
        assert kafka["ssl_cafile"] == str(ca)
    else:
        assert kafka["security_protocol"] == "PLAINTEXT"


def test_the_default_probe_passes_against_the_classifiers_metrics_endpoint(
    rendered: dict[str, Path],
):
    """Run the rendered probe command against a real prometheus_client endpoint on 127.0.0.1,
    as `stream run --metrics-port` serves it, and against a dead port."""
    import subprocess
    import sys

    from prometheus_client import start_http_server

    from cluster.processes import free_port

    container = _stream(_docs(rendered, "values.yaml"))
    probe = container["livenessProbe"]["exec"]["command"]
    port = int(container["command"][container["command"].index("--metrics-port") + 1])
    assert probe[0] == "python"

    def run(script: str) -> int:
        return subprocess.run([sys.executable, "-c", script], timeout=30, check=False).returncode

    dead = probe[-1].replace(f":{port}/", f":{free_port()}/")
    assert run(dead) != 0
    live_port = free_port()
    server, thread = start_http_server(live_port, addr="127.0.0.1")
    try:
        assert run(probe[-1].replace(f":{port}/", f":{live_port}/")) == 0
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

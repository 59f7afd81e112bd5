"""The Helm chart, for real: helm lint + helm template for every values file, kubeconform
against the Kubernetes, KubeRay, KEDA and Prometheus-operator schemas, and policy checks over
the rendered YAML (the secure defaults: nothing of Ray exposed, token auth, no secret in values).
"""

from __future__ import annotations

import ipaddress
import os
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, replace
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


def _values(variant: str) -> dict[str, Any]:
    """values.yaml with a values file over it (maps merge, everything else replaces)."""

    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            return {k: merge(base.get(k), over[k]) if k in over else base[k] for k in base | over}
        return over

    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    for path in _files(variant):
        values = merge(values, yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    return values


def _ray_clusters(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = [d["spec"]["rayClusterConfig"] for d in _kind(docs, "RayService")]
    return out + [d["spec"]["rayClusterSpec"] for d in _kind(docs, "RayJob")]


def _containers(doc: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod spec, container) for every container and init container a workload renders."""
    for pod in _pod_specs(doc):
        for container in pod.get("initContainers", []) + pod["containers"]:
            yield pod, container


# -- a NetworkPolicy evaluator over the rendered policies ------------------------------------------
# The semantics of networking.k8s.io/v1: a pod selected by a policy of a direction is isolated in
# that direction and admits only what some rule of those policies allows; policies add up. A
# connection needs the source's egress and the destination's ingress. Everything rendered lives
# in the release's namespace (helm template: "default").

RELEASE_NAMESPACE = "default"


@dataclass(frozen=True)
class Endpoint:
    name: str
    labels: dict[str, str]
    namespace: str | None = RELEASE_NAMESPACE  # None: an address outside the cluster
    ip: str = "10.0.0.10"

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace or ""}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, op, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _peer_matches(peer: dict[str, Any], other: Endpoint) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        address = ipaddress.ip_address(other.ip)
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(c) for c in block.get("except", [])
        )
    if other.namespace is None:  # pod and namespace selectors match pods only
        return False
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], other.namespace_labels):
            return False
    elif other.namespace != RELEASE_NAMESPACE:
        return False
    return _selects(peer.get("podSelector", {}), other.labels)


def _rule_matches(rule: dict[str, Any], peers_key: str, other: Endpoint, port: int, protocol: str):
    peers = rule.get(peers_key)
    if peers is not None and not any(_peer_matches(p, other) for p in peers):
        return False
    ports = rule.get("ports")
    return ports is None or any(
        p.get("protocol", "TCP") == protocol and p.get("port", port) == port for p in ports
    )


def _admits(
    policies: list[dict[str, Any]],
    direction: str,
    pod: Endpoint,
    other: Endpoint,
    port: int,
    protocol: str = "TCP",
) -> bool:
    """Does `pod` let this connection to/from `other` through in `direction`?"""
    if pod.namespace != RELEASE_NAMESPACE:
        return True  # no policy of the release selects it
    selecting = [
        p
        for p in policies
        if direction in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], pod.labels)
    ]
    if not selecting:
        return True
    key, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    return any(
        _rule_matches(rule, peers, other, port, protocol)
        for policy in selecting
        for rule in policy["spec"].get(key) or []
    )


def _connects(
    policies: list[dict[str, Any]],
    source: Endpoint,
    target: Endpoint,
    port: int,
    protocol: str = "TCP",
) -> bool:
    return _admits(policies, "Egress", source, target, port, protocol) and _admits(
        policies, "Ingress", target, source, port, protocol
    )


def _pods(docs: list[dict[str, Any]]) -> list[Endpoint]:
    """Every pod template of the release, with the labels its pods carry."""
    pods = []
    for doc in docs:
        spec = doc.get("spec", {})
        templates: list[tuple[str, dict[str, Any]]] = []
        if doc["kind"] == "Deployment":
            templates.append((doc["metadata"]["name"], spec["template"]))
        cluster = {"RayService": "rayClusterConfig", "RayJob": "rayClusterSpec"}.get(doc["kind"])
        if cluster:
            name = doc["metadata"]["name"]
            templates.append((f"{name}-head", spec[cluster]["headGroupSpec"]["template"]))
            for group in spec[cluster]["workerGroupSpecs"]:
                templates.append((f"{name}-{group['groupName']}", group["template"]))
        if doc["kind"] == "RayJob":
            templates.append((f"{doc['metadata']['name']}-submitter", spec["submitterPodTemplate"]))
        for name, template in templates:
            pods.append(Endpoint(name, template.get("metadata", {}).get("labels", {})))
    return pods


KUBE_DNS = Endpoint("coredns", {"k8s-app": "kube-dns"}, "kube-system")
OUTSIDE = Endpoint("somewhere", {}, None, ip="203.0.113.7")


# -- lint, render, validate -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_passes_strict(built_tools: k8s.Tools, variant: str):
    out = k8s.helm_lint(built_tools, next(iter(_files(variant)), None))
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
    policies = _kind(docs, "NetworkPolicy")
    for cluster in _ray_clusters(docs):
        for spec in [cluster["headGroupSpec"]["template"]] + [
            g["template"] for g in cluster["workerGroupSpecs"]
        ]:
            assert spec["metadata"]["labels"]["framecast.io/ray"] == "true"
    pods = _pods(docs)
    heads = [p for p in pods if p.labels.get("app.kubernetes.io/component") == "ray-head"]
    assert heads
    ray = next(p for p in pods if p.labels.get("framecast.io/ray") == "true")
    operator = Endpoint("kuberay-operator", {"app": "kuberay"}, "kuberay-system")
    stranger = Endpoint("stranger", {"app": "other"})  # same namespace, no release labels
    for head in heads:
        train = head.labels["framecast.io/ray-cluster"] == "train"
        for port in sorted(RAY_PRIVATE_PORTS):
            assert _connects(policies, ray, head, port)  # Ray pods reach each other everywhere
            assert not _connects(policies, stranger, head, port)
            assert _connects(policies, operator, head, port) == (port in {8265, 52365})
            for pod in pods:
                component = pod.labels.get("app.kubernetes.io/component")
                if component == "stream-classifier":  # the Ray Client port only
                    assert _connects(policies, pod, head, port) == (port == 10001 and not train)
                if component == "ray-job-submitter":  # the Jobs API of its own cluster only
                    assert _connects(policies, pod, head, port) == (port == 8265 and train)
    if _kind(docs, "Deployment"):
        stream = next(p for p in policies if p["metadata"]["name"] == "framecast-stream")
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


# -- read-only roots and the paths processes write -----------------------------------------------

# Containers allowed a writable root filesystem: none. An entry needs a reason in values.yaml
# (containerSecurityContext) and docs/deploy.md; the schema refuses readOnlyRootFilesystem=false
# for the chart's own containers anyway.
WRITABLE_ROOT_ALLOWLIST: frozenset[tuple[str, str]] = frozenset()
# Environment variables naming a directory the process writes to.
WRITABLE_ENV = ("FRAMECAST_HOME", "XDG_CACHE_HOME", "KERAS_HOME", "CUDA_CACHE_PATH", "TMPDIR")


def _writable_mounts(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> volume, for the container's writable mounts."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    out = {}
    for mount in container.get("volumeMounts", []):
        assert mount["name"] in volumes, (container["name"], mount)  # every mount has its volume
        if not mount.get("readOnly"):
            out[mount["mountPath"]] = volumes[mount["name"]]
    return out


def _under(path: str, mounts: dict[str, Any]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_container_runs_with_a_read_only_root(rendered: dict[str, Path], variant: str):
    docs = _docs(rendered, variant)
    containers = [(doc, c) for doc in docs for _, c in _containers(doc)]
    assert containers
    for doc, container in containers:
        security = container["securityContext"]
        if (doc["kind"], container["name"]) in WRITABLE_ROOT_ALLOWLIST:
            continue
        assert security["readOnlyRootFilesystem"] is True, (doc["kind"], container["name"])
        assert security["runAsNonRoot"] is True
        assert security["seccompProfile"]["type"] == "RuntimeDefault"
        assert security["capabilities"]["drop"] == ["ALL"]
    # KubeRay's autoscaler sidecar (RayService head) gets the same context and its scratch.
    for service in _kind(docs, "RayService"):
        cluster = service["spec"]["rayClusterConfig"]
        options = cluster["autoscalerOptions"]
        assert options["securityContext"]["readOnlyRootFilesystem"] is True
        head = cluster["headGroupSpec"]["template"]["spec"]
        volumes = {v["name"]: v for v in head["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in options["volumeMounts"]}
        # ray-logs: the volume KubeRay shares between the head and its autoscaler at /tmp/ray.
        assert mounts == {"/tmp": "tmp", "/tmp/ray": "ray-logs"}
        assert all("emptyDir" in volumes[name] for name in mounts.values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_writable_path_has_a_volume(rendered: dict[str, Path], variant: str):
    docs = _docs(rendered, variant)
    ray_pod_specs = [
        spec
        for cluster in _ray_clusters(docs)
        for spec in [cluster["headGroupSpec"]["template"]["spec"]]
        + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    ]
    for doc in docs:
        for pod, container in _containers(doc):
            writable = _writable_mounts(pod, container)
            # /tmp everywhere: Python tempfiles and the caches below, on a bounded emptyDir.
            assert writable["/tmp"]["emptyDir"]["sizeLimit"], container["name"]
            for env in container.get("env", []):
                if env["name"] in WRITABLE_ENV:
                    assert _under(env["value"], writable), (container["name"], env)
            if any(pod is spec for spec in ray_pod_specs):
                # Ray's temp root: sessions, logs, sockets, spilled objects.
                ray_tmp = writable["/tmp/ray"]
                assert ray_tmp["name"] == "ray-logs" and ray_tmp["emptyDir"]["sizeLimit"]
    # Serve only reads artifacts; training writes them (and Ray Train's checkpoints under
    # FRAMECAST_HOME) to the artifacts volume.
    for service in _kind(docs, "RayService"):
        cluster = service["spec"]["rayClusterConfig"]
        for spec in [cluster["headGroupSpec"]["template"]["spec"]] + [
            g["template"]["spec"] for g in cluster["workerGroupSpecs"]
        ]:
            (mount,) = [
                m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "artifacts"
            ]
            assert mount["readOnly"] is True
    for job in _kind(docs, "RayJob"):
        cluster = job["spec"]["rayClusterSpec"]
        home = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["FRAMECAST_HOME"]
        argv = shlex.split(job["spec"]["entrypoint"])
        out = argv[argv.index("--out") + 1]
        for spec in [cluster["headGroupSpec"]["template"]["spec"]] + [
            g["template"]["spec"] for g in cluster["workerGroupSpecs"]
        ]:
            writable = _writable_mounts(spec, spec["containers"][0])
            assert _under(home, writable) and _under(out, writable)
            assert "persistentVolumeClaim" in writable[_mount_of(home, writable)]


def _mount_of(path: str, mounts: dict[str, Any]) -> str:
    return max((m for m in mounts if _under(path, {m: None})), key=len)


def test_a_writable_root_is_refused(built_tools: k8s.Tools):
    with pytest.raises(k8s.ToolError, match="readOnlyRootFilesystem"):
        k8s.helm_template(
            built_tools, sets=["containerSecurityContext.readOnlyRootFilesystem=false"]
        )


# -- network policies: every pod isolated both ways, what each may reach --------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pod_is_selected_by_an_ingress_and_an_egress_policy(
    rendered: dict[str, Path], variant: str
):
    docs = _docs(rendered, variant)
    policies = _kind(docs, "NetworkPolicy")
    pods = _pods(docs)
    assert pods
    for pod in pods:
        for direction in ("Ingress", "Egress"):
            assert any(
                direction in p["spec"]["policyTypes"]
                and _selects(p["spec"]["podSelector"], pod.labels)
                for p in policies
            ), (pod.name, direction)
    for policy in policies:  # and no policy selects nothing (a typo in a label)
        assert any(_selects(policy["spec"]["podSelector"], p.labels) for p in pods), policy


@pytest.mark.parametrize("variant", VARIANTS)
def test_egress_is_denied_by_default_and_allowed_where_needed(
    rendered: dict[str, Path], variant: str
):
    docs = _docs(rendered, variant)
    policies = _kind(docs, "NetworkPolicy")
    pods = _pods(docs)
    by_component: dict[str, list[Endpoint]] = {}
    for pod in pods:
        by_component.setdefault(pod.labels["app.kubernetes.io/component"], []).append(pod)
    ray_pods = [p for p in pods if p.labels.get("framecast.io/ray") == "true"]
    serve_head = next(
        p for p in by_component["ray-head"] if p.labels["framecast.io/ray-cluster"] == "serve"
    )
    kube_api = Endpoint("apiserver", {}, None, ip="172.20.0.1")
    stranger = Endpoint("stranger", {"app": "other"})
    for pod in pods:
        # DNS to the cluster DNS pods only; nothing to an address outside or a stranger pod.
        assert _admits(policies, "Egress", pod, KUBE_DNS, 53, "UDP")
        assert _admits(policies, "Egress", pod, KUBE_DNS, 53, "TCP")
        assert not _admits(policies, "Egress", pod, stranger, 53, "UDP")
        # The Kubernetes API: only the RayService head (its autoscaler sidecar); with
        # networkPolicy.kubeApi.cidrs empty (every values file) on any address.
        assert _admits(policies, "Egress", pod, kube_api, 443) == (pod is serve_head), pod.name
        for port in (80, 443, 8080):
            allowed = pod is serve_head and port == 443
            assert _admits(policies, "Egress", pod, OUTSIDE, port) == allowed, (pod.name, port)
    for source in ray_pods:  # Ray pods reach each other on every port (GCS, object manager, ...)
        for target in ray_pods:
            for port in (6379, 8076, 10002, 52365):
                assert _connects(policies, source, target, port)
    for classifier in by_component.get("stream-classifier", []):
        # kafka.egress: the broker ports, to the listed CIDRs (none listed: any address).
        egress = _values(variant)["kafka"]["egress"]
        broker = OUTSIDE
        if egress["cidrs"]:
            broker = replace(OUTSIDE, ip=str(ipaddress.ip_network(egress["cidrs"][0])[5]))
            assert not _admits(policies, "Egress", classifier, OUTSIDE, egress["ports"][0])
        for port in egress["ports"]:
            assert _admits(policies, "Egress", classifier, broker, port)
        assert not _admits(policies, "Egress", classifier, broker, 9094)
        for target in ray_pods:
            serve = target.labels["framecast.io/ray-cluster"] == "serve"
            head = serve and target is serve_head
            assert _connects(policies, classifier, target, 8000) == serve
            assert _connects(policies, classifier, target, 10001) == head
            assert not _connects(policies, classifier, target, 6379)


def test_egress_destinations_follow_values(built_tools: k8s.Tools):
    sets = [
        "kafka.egress.namespaces[0]=kafka",
        "networkPolicy.dns.namespace=",
        "networkPolicy.kubeApi.cidrs[0]=172.20.0.1/32",
    ]
    docs = k8s.documents(k8s.helm_template(built_tools, [CHART / "values-sasl.yaml"], sets=sets))
    policies = _kind(docs, "NetworkPolicy")
    (head,) = [p for p in _pods(docs) if p.name == "framecast-head"]
    assert _admits(policies, "Egress", head, Endpoint("apiserver", {}, None, ip="172.20.0.1"), 443)
    assert not _admits(policies, "Egress", head, OUTSIDE, 443)
    (classifier,) = [p for p in _pods(docs) if "framecast-stream" in p.name]
    broker = Endpoint("broker", {"strimzi.io/kind": "Kafka"}, "kafka")
    assert _admits(policies, "Egress", classifier, broker, 9096)
    assert _admits(policies, "Egress", classifier, replace(OUTSIDE, ip="10.20.3.4"), 9096)
    assert not _admits(policies, "Egress", classifier, OUTSIDE, 9096)  # outside 10.20.0.0/16
    assert not _admits(policies, "Egress", classifier, broker, 9092)
    # dns.namespace "": port 53 to any destination (NodeLocal DNSCache, an outside resolver).
    assert _admits(policies, "Egress", classifier, OUTSIDE, 53, "UDP")


# -- the policy in front of Serve -----------------------------------------------------------------


def _serve_pods(docs: list[dict[str, Any]]) -> list[Endpoint]:
    pods = [p for p in _pods(docs) if p.labels.get("framecast.io/ray-cluster") == "serve"]
    (service,) = _kind(docs, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert len(pods) == 1 + len(cluster["workerGroupSpecs"])  # proxies on every node
    return pods


@pytest.mark.parametrize("variant", VARIANTS)
def test_serve_admits_the_classifiers_and_denies_a_pod_without_the_label(
    rendered: dict[str, Path], variant: str
):
    docs = _docs(rendered, variant)
    policies = _kind(docs, "NetworkPolicy")
    (serve_policy,) = [p for p in policies if p["metadata"]["name"] == "framecast-serve"]
    assert serve_policy["spec"]["policyTypes"] == ["Ingress"]
    for rule in serve_policy["spec"]["ingress"]:
        assert [p["port"] for p in rule["ports"]] == [8000]
    classifiers = [p for p in _pods(docs) if "framecast-stream" in p.name]
    # The classifier's labels minus its component: same release, same namespace.
    unlabelled = [
        Endpoint(
            "unlabelled", {k: v for k, v in p.labels.items() if k != "app.kubernetes.io/component"}
        )
        for p in classifiers
    ] or [Endpoint("unlabelled", {"app.kubernetes.io/instance": "framecast"})]
    elsewhere = [Endpoint(c.name, c.labels, "elsewhere") for c in classifiers]
    namespaces = _values(variant)["networkPolicy"]["serveClients"]
    for target in _serve_pods(docs):
        for classifier in classifiers:
            assert _admits(policies, "Ingress", target, classifier, 8000)
            assert _connects(policies, classifier, target, 8000)
        for pod in unlabelled + elsewhere:
            assert not _admits(policies, "Ingress", target, pod, 8000), pod
        for namespace in namespaces:  # values-gpu.yaml: any pod of `apps`
            assert _admits(policies, "Ingress", target, Endpoint("app", {}, namespace), 8000)
            assert not _admits(policies, "Ingress", target, Endpoint("app", {}, namespace), 6379)
        assert not _admits(policies, "Ingress", target, Endpoint("app", {}, "other"), 8000)


def test_serve_admits_configured_sources_such_as_an_ingress_controller(built_tools: k8s.Tools):
    controller = {"app.kubernetes.io/name": "ingress-nginx"}
    sets = [
        r"networkPolicy.serve.from[0].namespaceSelector.matchLabels.kubernetes\.io/metadata\.name"
        "=ingress-nginx",
        r"networkPolicy.serve.from[0].podSelector.matchLabels.app\.kubernetes\.io/name"
        "=ingress-nginx",
    ]
    docs = k8s.documents(k8s.helm_template(built_tools, sets=sets))
    policies = _kind(docs, "NetworkPolicy")
    for target in _serve_pods(docs):
        assert _admits(
            policies, "Ingress", target, Endpoint("nginx", controller, "ingress-nginx"), 8000
        )
        assert not _admits(
            policies, "Ingress", target, Endpoint("nginx", controller, "ingress-nginx"), 8265
        )
        assert not _admits(
            policies, "Ingress", target, Endpoint("other", {}, "ingress-nginx"), 8000
        )
        assert not _admits(policies, "Ingress", target, Endpoint("nginx", controller), 8000)


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
    kafka = settings.kafka.rdkafka_config()
    assert kafka["bootstrap.servers"] == "b-1:9096,b-2:9096"
    assert kafka["client.id"] == "framecast-stream-abc12"
    assert settings.ray.address == "ray://framecast-head-svc:10001"
    assert settings.serve.app_name == "framecast"
    if variant == "values-sasl.yaml":
        assert kafka["security.protocol"] == "sasl_ssl"
        assert kafka["sasl.mechanism"] == "SCRAM-SHA-512"
        assert kafka["sasl.username"] == "fc"
        assert kafka["sasl.password"] == "pw"
        assert kafka["ssl.ca.location"] == str(ca)
    else:
        assert kafka["security.protocol"] == "plaintext"


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


# -- the Grafana dashboard ------------------------------------------------------------------------


def _code_literals(*roots: Path) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for r in roots for p in r.rglob("*.py"))


def test_grafana_dashboard_renders_for_the_sidecar_and_uses_only_metrics_of_the_code(
    built_tools: k8s.Tools, rendered: dict[str, Path], tmp_path: Path
):
    """metrics.grafanaDashboard.enabled renders a ConfigMap with the sidecar's label (valid for
    kubeconform) whose JSON parses, and whose every metric is one framecast (streams/,
    serving/) or Ray Serve exports: ``framecast_stream_*`` by prometheus_client, ``ray_<name>``
    for a Ray metric (histograms as ``_bucket``, Ray counters with ``_total``)."""
    import importlib.util
    import json
    import re

    assert not _kind(_docs(rendered, "values.yaml"), "ConfigMap"), "off by default"
    on = tmp_path / "grafana.yaml"
    on.write_text(k8s.helm_template(
        built_tools, sets=["metrics.grafanaDashboard.enabled=true",
                           "metrics.grafanaDashboard.annotations.grafana_folder=framecast"]
    ), encoding="utf-8")
    assert k8s.kubeconform(built_tools, [on])["summary"]["invalid"] == 0
    maps = _kind(k8s.documents(on.read_text(encoding="utf-8")), "ConfigMap")
    assert len(maps) == 1
    assert maps[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert maps[0]["metadata"]["annotations"] == {"grafana_folder": "framecast"}
    dashboard = json.loads(maps[0]["data"]["framecast.json"])
    assert dashboard["uid"] == "framecast"
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    names = set()
    for expr in exprs:
        names |= set(re.findall(r"\b((?:framecast|ray)_[a-z0-9_]+)\b", expr))
    assert any(n.startswith("framecast_stream_") for n in names)
    assert any(n.startswith("ray_framecast_") for n in names)
    assert "ray_serve_deployment_replica_healthy" in names  # the replica count

    repo = CHART.parents[1]
    ours = _code_literals(repo / "streams", repo / "serving")
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations
    ray_serve = _code_literals(Path(next(iter(spec.submodule_search_locations))) / "serve")

    def defined(name: str) -> bool:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if base.startswith("ray_serve_"):
            bare = base.removeprefix("ray_")
            return any(f'"{n}"' in ray_serve for n in (bare, bare.removesuffix("_total")))
        return f'"{base.removeprefix("ray_")}"' in ours

    missing = sorted(n for n in names if not defined(n))
    assert missing == [], f"the dashboard uses metrics no code exports: {missing}"


# -- Serve replicas on Kafka lag (serve.autoscaleOn=lag, values-lag.yaml) -------------------------


def test_lag_autoscaling_puts_the_policy_in_the_serve_config_and_kafka_in_the_head(
    rendered: dict[str, Path],
):
    import inspect

    from ray.serve.config import AutoscalingConfig

    from serving.autoscale import POLICY_PATH, KafkaLagPolicy

    docs = _docs(rendered, "values-lag.yaml")
    (service,) = _kind(docs, "RayService")
    (application,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    (deployment,) = application["deployments"]
    assert deployment["name"] == "Classifier"
    scaling = deployment["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (1, 8)
    policy = scaling["policy"]
    assert policy["policy_function"] == POLICY_PATH
    kwargs = policy["policy_kwargs"]
    assert kwargs["group"] == "framecast" and kwargs["topic"] == "frames"
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert "bootstrap" not in kwargs and not any("password" in k for k in kwargs)
    inspect.signature(KafkaLagPolicy).bind(**kwargs)  # the policy takes exactly these
    AutoscalingConfig(**scaling)  # Serve's own model accepts it (and imports the policy)
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    env = {e["name"]: e for e in head["containers"][0]["env"]}
    for name, key in (("FRAMECAST_KAFKA_BOOTSTRAP_SERVERS", "bootstrap_servers"),
                      ("FRAMECAST_KAFKA_SASL_PASSWORD", "sasl_password")):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "framecast-kafka", "key": key}
    assert {v["name"] for v in head["volumes"]} >= {"kafka-tls"}
    (egress,) = [p for p in _kind(docs, "NetworkPolicy")
                 if p["metadata"]["name"].endswith("-ray-head-kafka")]
    assert egress["spec"]["egress"][0]["ports"] == [{"protocol": "TCP", "port": 9096}]
    (scaled,) = _kind(docs, "ScaledObject")  # the classifiers: KEDA on the same group
    assert scaled["spec"]["triggers"][0]["metadata"]["consumerGroup"] == kwargs["group"]


def test_requests_autoscaling_by_default_leaves_the_serve_config_and_head_alone(
    rendered: dict[str, Path],
):
    docs = _docs(rendered, "values.yaml")
    (service,) = _kind(docs, "RayService")
    (application,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert "deployments" not in application
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert not any(e["name"].startswith("FRAMECAST_KAFKA") for e in head["containers"][0]["env"])
    assert not [p for p in _kind(docs, "NetworkPolicy")
                if p["metadata"]["name"].endswith("-ray-head-kafka")]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["serve.autoscaleOn=cpu"], "autoscaleOn"),
        (["serve.autoscaleOn=lag", "serve.maxReplicas=1"], "maxReplicas > serve.minReplicas"),
        (["serve.lag.targetPerReplica=0"], "targetPerReplica"),
    ],
)
def test_bad_lag_autoscaling_values_are_refused(
    built_tools: k8s.Tools, sets: list[str], message: str
):
    with pytest.raises(k8s.ToolError, match=message):
        k8s.helm_template(built_tools, sets=sets)

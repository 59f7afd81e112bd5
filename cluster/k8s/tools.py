"""Chart and manifest validation for real: helm, kubeconform and JSON schemas, built offline.

``python -m cluster.k8s.tools ensure`` builds (once, into ``.framecast/tools``) everything
``make chart-check`` needs, from package registries only:

* ``helm`` and ``kubeconform``, compiled with ``go install`` at pinned versions;
* the Kubernetes JSON schemas of one Kubernetes version, taken from the PyPI wheel
  ``kubernetes-validate`` (which ships them) and rewritten as standalone-strict files in
  kubeconform's layout (every ``$ref`` to the shared definitions inlined locally);
* the CRD schemas of KubeRay (``ray.io``), KEDA (``keda.sh``) and the Prometheus operator
  (``monitoring.coreos.com``), read from the CRD YAMLs inside their Go modules
  (``go mod download``) and converted from ``openAPIV3Schema`` to strict JSON schema.

``python -m cluster.k8s.tools check`` then runs ``helm lint`` and ``helm template`` for every
values file of the chart and validates the rendered manifests and the KubeRay manifests
under ``cluster/k8s`` with ``kubeconform -strict`` against those schemas; a resource without
a schema is an error, not a skip.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cluster.exceptions import ToolError

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("FRAMECAST_TOOLS_DIR", REPO / ".framecast" / "tools"))
CHART = REPO / "helm" / "framecast"
MANIFESTS = REPO / "cluster" / "k8s"

HELM_VERSION = "v3.22.0"
KUBECONFORM_VERSION = "v0.8.0"
KUBERNETES_VERSION = "1.34.0"
KUBERNETES_VALIDATE_VERSION = "1.37.0"  # PyPI wheel that ships the Kubernetes schemas
KUBERAY_VERSION = "v1.6.1"
KEDA_VERSION = "v2.21.0"
PROMETHEUS_OPERATOR_VERSION = "v0.85.0"

# Go module -> directory inside it that holds the CRD YAMLs.
CRD_MODULES: dict[str, tuple[str, str]] = {
    "kuberay": (
        f"github.com/ray-project/kuberay/ray-operator@{KUBERAY_VERSION}",
        "config/crd/bases",
    ),
    "keda": (f"github.com/kedacore/keda/v2@{KEDA_VERSION}", "config/crd/bases"),
    "prometheus-operator": (
        f"github.com/prometheus-operator/prometheus-operator@{PROMETHEUS_OPERATOR_VERSION}",
        "example/prometheus-operator-crd",
    ),
}
CRD_FILES: dict[str, tuple[str, ...]] = {
    "kuberay": ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml"),
    "keda": ("keda.sh_scaledobjects.yaml", "keda.sh_triggerauthentications.yaml"),
    "prometheus-operator": ("monitoring.coreos.com_servicemonitors.yaml",),
}


@dataclass(frozen=True)
class Tools:
    """Where the built tools and schemas are."""

    helm: Path
    kubeconform: Path
    k8s_schemas: Path
    crd_schemas: Path

    def schema_locations(self) -> list[str]:
        """kubeconform ``-schema-location`` templates: core kinds, then CRDs by group."""
        return [
            str(self.k8s_schemas) + "/{{ .ResourceKind }}{{ .KindSuffix }}.json",
            str(self.crd_schemas)
            + "/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json",
        ]


def _run(cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False, **kwargs)


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise ToolError(
            "missing: go (Go 1.22+; Debian: apt-get install golang) - needed once to build "
            "helm and kubeconform and to fetch the KubeRay/KEDA CRDs"
        )
    return go


# -- helm and kubeconform -------------------------------------------------------------------------


def _go_install(package: str, version: str, name: str, cache: Path) -> Path:
    target_dir = cache / f"{name}-{version}"
    binary = target_dir / name
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    target_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOBIN": str(target_dir), "CGO_ENABLED": "0"}
    ldflags = []
    if name == "helm":
        ldflags = ["-ldflags", f"-X helm.sh/helm/v3/internal/version.version={version}"]
    result = _run([_go(), "install", *ldflags, f"{package}@{version}"], env=env)
    if result.returncode != 0 or not binary.is_file():
        raise ToolError(f"go install {package}@{version} failed:\n{result.stderr[-3000:]}")
    return binary


# -- Kubernetes schemas ---------------------------------------------------------------------------


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            yield ref
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


_KIND_REF = "/api/_definitions.json#/$defs/"  # how a kind's file points at the definitions
_DEF_REF = "#/$defs/"  # how the definitions point at each other


def _def_name(ref: str) -> str | None:
    for prefix in (_KIND_REF, _DEF_REF):
        if ref.startswith(prefix):
            return ref[len(prefix) :]
    return None


def _rewrite_refs(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            name = _def_name(value) if key == "$ref" and isinstance(value, str) else None
            out[key] = "#/definitions/" + name if name is not None else _rewrite_refs(value)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(value) for value in node]
    return node


def standalone_schema(schema: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    """Inline the definitions a kind's schema reaches (transitively) as local ``definitions``.

    kubeconform compiles schemas as JSON Schema draft 4 unless told otherwise, hence
    ``definitions`` (not ``$defs``) and no ``$schema``.
    """
    needed: dict[str, Any] = {}
    pending = [n for n in map(_def_name, _refs(schema)) if n is not None]
    while pending:
        name = pending.pop()
        if name in needed:
            continue
        if name not in definitions:
            raise ToolError(f"schema definition {name} not found")
        needed[name] = definitions[name]
        pending.extend(n for n in map(_def_name, _refs(definitions[name])) if n is not None)
    out = _rewrite_refs(schema)
    out.pop("$schema", None)
    out["definitions"] = {name: _rewrite_refs(value) for name, value in needed.items()}
    return out


def _kubernetes_validate_wheel(cache: Path) -> Path:
    downloads = cache / "downloads"
    wheel = downloads / f"kubernetes_validate-{KUBERNETES_VALIDATE_VERSION}-py3-none-any.whl"
    if wheel.is_file():
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    result = _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "-d", str(downloads), f"kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"]
    )
    if result.returncode != 0 or not wheel.is_file():
        raise ToolError(f"pip download kubernetes-validate failed:\n{result.stderr[-3000:]}")
    return wheel


def build_kubernetes_schemas(cache: Path) -> Path:
    """kubeconform's ``vX.Y.Z-standalone-strict`` directory for KUBERNETES_VERSION."""
    target = cache / "schemas" / f"v{KUBERNETES_VERSION}-standalone-strict"
    stamp = target / ".complete"
    if stamp.is_file():
        return target
    wheel = _kubernetes_validate_wheel(cache)
    base = f"kubernetes_validate/kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict/"
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.startswith(base) and n.endswith(".json")]
        if not names:
            raise ToolError(f"{wheel.name} has no schemas for Kubernetes {KUBERNETES_VERSION}")
        definitions = json.loads(archive.read(base + "_definitions.json"))["$defs"]
        count = 0
        for name in names:
            filename = name[len(base) :]
            if filename.startswith("_") or "/" in filename:
                continue
            schema = json.loads(archive.read(name))
            kind = schema.get("properties", {}).get("kind", {})
            if not kind.get("enum"):
                continue  # only top-level kinds
            (tmp / filename).write_text(
                json.dumps(standalone_schema(schema, definitions)), encoding="utf-8"
            )
            count += 1
    (tmp / ".complete").write_text(f"{count} kinds from kubernetes-validate "
                                   f"{KUBERNETES_VALIDATE_VERSION}\n", encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


# -- CRD schemas ----------------------------------------------------------------------------------


def strict_crd_schema(node: Any) -> Any:
    """A CRD openAPIV3Schema as strict JSON schema.

    Objects with ``properties`` reject unknown fields (``additionalProperties: false``)
    unless the CRD says ``x-kubernetes-preserve-unknown-fields``; ``nullable`` becomes a
    ``null`` type; int-or-string fields accept both. This is what kubeconform's own
    ``openapi2jsonschema.py`` does for CRDs.
    """
    if isinstance(node, list):
        return [strict_crd_schema(value) for value in node]
    if not isinstance(node, dict):
        return node
    out = {key: strict_crd_schema(value) for key, value in node.items()}
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_schemas(crd: dict[str, Any]) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    """(group, kind, version, JSON schema) for every served version of a CRD document."""
    spec = crd["spec"]
    group, kind = spec["group"], spec["names"]["kind"]
    for version in spec["versions"]:
        if not version.get("served", True):
            continue
        schema = version.get("schema", {}).get("openAPIV3Schema")
        if schema is None:
            continue
        strict = strict_crd_schema(schema)
        strict["$schema"] = "http://json-schema.org/draft-07/schema#"
        yield group, kind, version["name"], strict


def _go_module_dir(module_at_version: str) -> Path:
    result = _run([_go(), "mod", "download", "-json", module_at_version], cwd=str(REPO))
    try:
        info = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise ToolError(f"go mod download {module_at_version}: {result.stderr[-2000:]}") from None
    if info.get("Error") or not info.get("Dir"):
        raise ToolError(f"go mod download {module_at_version}: {info.get('Error')}")
    return Path(info["Dir"])


def build_crd_schemas(cache: Path) -> Path:
    """``<group>/<kind>_<version>.json`` for the KubeRay, KEDA and Prometheus-operator CRDs."""
    target = cache / "schemas" / (
        f"crds-kuberay-{KUBERAY_VERSION}-keda-{KEDA_VERSION}-promop-{PROMETHEUS_OPERATOR_VERSION}"
    )
    stamp = target / ".complete"
    if stamp.is_file():
        return target
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    written = []
    for key, (module, subdir) in CRD_MODULES.items():
        root = _go_module_dir(module) / subdir
        for filename in CRD_FILES[key]:
            crd = yaml.safe_load((root / filename).read_text(encoding="utf-8"))
            for group, kind, version, schema in crd_schemas(crd):
                path = tmp / group / f"{kind.lower()}_{version}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(schema), encoding="utf-8")
                written.append(f"{group}/{kind}/{version} from {module}")
    (tmp / ".complete").write_text("\n".join(written) + "\n", encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def ensure_tools(cache: Path = CACHE) -> Tools:
    """Build whatever is missing from the cache; return where everything is."""
    helm = _go_install("helm.sh/helm/v3/cmd/helm", HELM_VERSION, "helm", cache)
    kubeconform = _go_install(
        "github.com/yannh/kubeconform/cmd/kubeconform", KUBECONFORM_VERSION, "kubeconform", cache
    )
    return Tools(helm, kubeconform, build_kubernetes_schemas(cache), build_crd_schemas(cache))


def tool_versions() -> dict[str, str]:
    """Every pinned version, for reports."""
    return {
        "helm": HELM_VERSION,
        "kubeconform": KUBECONFORM_VERSION,
        "kubernetes_schemas": f"{KUBERNETES_VERSION} (kubernetes-validate "
        f"{KUBERNETES_VALIDATE_VERSION})",
        "kuberay_crds": KUBERAY_VERSION,
        "keda_crds": KEDA_VERSION,
        "prometheus_operator_crds": PROMETHEUS_OPERATOR_VERSION,
    }


# -- helm and kubeconform runs --------------------------------------------------------------------


def values_files(chart: Path = CHART) -> list[Path]:
    """The chart's extra values files (``values-*.yaml``), each rendered on top of values.yaml."""
    return sorted(chart.glob("values-*.yaml"))


def helm_lint(tools: Tools, values: Path | None = None, chart: Path = CHART) -> str:
    """``helm lint --strict``; raises ToolError with helm's output when it fails."""
    cmd = [str(tools.helm), "lint", "--strict", str(chart), "--kube-version", KUBERNETES_VERSION]
    if values is not None:
        cmd += ["-f", str(values)]
    result = _run(cmd, env=_helm_env(tools))
    if result.returncode != 0:
        raise ToolError(f"helm lint {values or ''} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


def _helm_env(tools: Tools) -> dict[str, str]:
    home = tools.helm.parent / "home"
    return {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


def helm_template(
    tools: Tools,
    values: Iterable[Path] = (),
    sets: Iterable[str] = (),
    chart: Path = CHART,
    release: str = "framecast",
    namespace: str = "framecast",
) -> str:
    """``helm template`` output (multi-document YAML); ToolError with helm's message on failure."""
    cmd = [str(tools.helm), "template", release, str(chart), "--namespace", namespace,
           "--kube-version", KUBERNETES_VERSION]
    for path in values:
        cmd += ["-f", str(path)]
    for item in sets:
        cmd += ["--set", item]
    result = _run(cmd, env=_helm_env(tools))
    if result.returncode != 0:
        raise ToolError(f"helm template failed:\n{result.stderr}")
    return result.stdout


def documents(rendered: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of rendered manifests."""
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def kubeconform(tools: Tools, paths: Sequence[Path]) -> dict[str, Any]:
    """Run ``kubeconform -strict`` on files; return its JSON report; ToolError if not all valid."""
    cmd = [str(tools.kubeconform), "-strict", "-summary", "-verbose", "-output", "json",
           "-kubernetes-version", KUBERNETES_VERSION]
    for location in tools.schema_locations():
        cmd += ["-schema-location", location]
    result = _run([*cmd, *map(str, paths)])
    try:
        report: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise ToolError(f"kubeconform: {result.stdout}{result.stderr}") from None
    summary = report.get("summary", {})
    bad = [r for r in report.get("resources", []) if r.get("status") != "statusValid"]
    if result.returncode != 0 or bad or summary.get("skipped"):
        lines = [f"{r.get('filename')}: {r.get('kind')}/{r.get('name')}: {r.get('status')} "
                 f"{r.get('msg', '')}" for r in bad]
        raise ToolError("kubeconform found problems:\n" + "\n".join(lines))
    if not summary.get("valid"):
        raise ToolError(f"kubeconform validated nothing in {list(map(str, paths))}")
    return report


def check(tools: Tools, out_dir: Path, log: Any = print) -> dict[str, int]:
    """Lint, render every values file and validate everything; return resources per file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    variants: list[tuple[str, list[Path]]] = [("values.yaml", [])]
    variants += [(path.name, [path]) for path in values_files()]
    for name, files in variants:
        helm_lint(tools, files[0] if files else None)
        rendered = helm_template(tools, files)
        target = out_dir / f"rendered-{Path(name).stem}.yaml"
        target.write_text(rendered, encoding="utf-8")
        report = kubeconform(tools, [target])
        counts[name] = int(report["summary"]["valid"])
        log(f"chart {name}: helm lint ok, {counts[name]} resources valid")
    manifests = sorted(MANIFESTS.glob("*.yaml"))
    report = kubeconform(tools, manifests)
    counts["cluster/k8s"] = int(report["summary"]["valid"])
    log(f"cluster/k8s: {counts['cluster/k8s']} KubeRay resources valid")
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cluster.k8s.tools ensure|check|versions``."""
    parser = argparse.ArgumentParser(prog="python -m cluster.k8s.tools")
    parser.add_argument("command", choices=("ensure", "check", "versions"))
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args(argv)
    if args.command == "versions":
        print(json.dumps(tool_versions(), indent=2))
        return 0
    try:
        tools = ensure_tools(args.cache)
        if args.command == "ensure":
            print(f"tools ready in {args.cache}: " + ", ".join(
                f"{k} {v}" for k, v in tool_versions().items()))
            return 0
        check(tools, args.cache / "rendered")
    except ToolError as error:
        print(f"chart-check failed: {error}", file=sys.stderr)
        return 1
    print("chart-check passed: " + ", ".join(f"{k} {v}" for k, v in tool_versions().items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

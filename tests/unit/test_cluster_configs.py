"""Ray cluster configs (cluster/ray-up.yaml, cluster/k8s/*.yaml) and the submission helpers.

The `ray up` YAML is validated against the cluster-config JSON schema that ships inside the
pinned ``ray`` package; the KubeRay manifests with kubeconform against the CRD schemas of
the pinned KubeRay release (built by ``python -m cluster.k8s.tools ensure``).
"""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from cluster import submit
from cluster.k8s import tools as k8s

REPO = Path(__file__).resolve().parents[2]
RAY_UP = REPO / "cluster" / "ray-up.yaml"
KUBERAY = {p.stem: p for p in (REPO / "cluster" / "k8s").glob("*.yaml")}


@pytest.fixture(scope="module")
def ray_schema() -> dict[str, Any]:
    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def ray_up() -> dict[str, Any]:
    return yaml.safe_load(RAY_UP.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def built_tools() -> k8s.Tools:
    return k8s.ensure_tools()


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load(KUBERAY[name].read_text(encoding="utf-8"))


# -- ray up --------------------------------------------------------------------------------------


def test_ray_up_config_matches_rays_schema(ray_schema: dict[str, Any], ray_up: dict[str, Any]):
    jsonschema.validate(ray_up, ray_schema)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("max_workers",), "ten"),
        (("not_a_ray_key",), 1),
        (("available_node_types", "gpu_worker", "resources", "GPU"), -1),
        (("docker", "imagee"), "typo"),
    ],
)
def test_ray_schema_rejects_broken_ray_up_configs(
    ray_schema: dict[str, Any], ray_up: dict[str, Any], path: tuple[str, ...], value: Any
):
    broken = copy.deepcopy(ray_up)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema)


def test_ray_up_has_a_gpu_worker_type_and_keeps_ports_private(ray_up: dict[str, Any]):
    types = ray_up["available_node_types"]
    assert ray_up["head_node_type"] in types
    gpu = types["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1
    assert gpu["max_workers"] > gpu["min_workers"] == 0
    head_start = " ".join(ray_up["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in head_start
    assert all("RAY_AUTH_MODE=token" in c for c in ray_up["worker_start_ray_commands"][1:])
    assert ray.__version__ in ray_up["docker"]["image"]


# -- KubeRay manifests ---------------------------------------------------------------------------


def test_kuberay_manifests_validate_against_the_crd_schemas(built_tools: k8s.Tools):
    report = k8s.kubeconform(built_tools, sorted(KUBERAY.values()))
    kinds = sorted(r["kind"] for r in report["resources"])
    assert kinds == ["RayCluster", "RayJob", "RayService"]


@pytest.mark.parametrize(
    ("name", "mutate", "message"),
    [
        ("raycluster", lambda d: d["spec"]["headGroupSpec"].update(bogus=1), "bogus"),
        ("rayjob-train", lambda d: d["spec"].update(shutdownAfterJobFinishes="yes"), "boolean"),
        ("rayservice", lambda d: d["spec"].update(serveConfigV2={"a": 1}), "serveConfigV2"),
        (
            "raycluster",
            lambda d: d["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0].update(
                imagePullPolicy=3
            ),
            "imagePullPolicy",
        ),
    ],
)
def test_kubeconform_rejects_broken_kuberay_manifests(
    built_tools: k8s.Tools, tmp_path: Path, name: str, mutate: Any, message: str
):
    doc = _load(name)
    mutate(doc)
    target = tmp_path / f"{name}.yaml"
    target.write_text(yaml.safe_dump(doc), encoding="utf-8")
    with pytest.raises(k8s.ToolError, match=message):
        k8s.kubeconform(built_tools, [target])


def _ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    return [
        ("raycluster", _load("raycluster")["spec"]),
        ("rayjob-train", _load("rayjob-train")["spec"]["rayClusterSpec"]),
        ("rayservice", _load("rayservice")["spec"]["rayClusterConfig"]),
    ]


@pytest.mark.parametrize(("name", "spec"), _ray_cluster_specs())
def test_kuberay_clusters_are_private_and_token_authenticated(name: str, spec: dict[str, Any]):
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert spec["rayVersion"] == ray.__version__
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in spec["workerGroupSpecs"]
    ]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert "limits" in c["resources"]


def test_raycluster_autoscales_its_gpu_group_from_zero():
    spec = _load("raycluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1


def test_rayjob_runs_framecast_train_and_deletes_its_cluster():
    spec = _load("rayjob-train")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:4] == ["python", "-m", "cluster.cli", "train"]
    assert argv[argv.index("--out") + 1].startswith("/mnt/artifacts/")
    _assert_train_flags_exist(argv[4:])


def test_rayservice_serve_config_builds_the_serving_app_args():
    from serving.app import AppArgs

    config = yaml.safe_load(_load("rayservice")["spec"]["serveConfigV2"])
    (application,) = config["applications"]
    assert application["import_path"] == "serving.app:app"
    parsed = AppArgs.model_validate(application["args"])
    assert parsed.serve.num_gpus == 1
    assert parsed.artifact_dir.startswith("/mnt/artifacts/")


def _assert_train_flags_exist(args: list[str]) -> None:
    import typer.main

    from cluster.cli import app

    command = typer.main.get_command(app)
    train = command.commands["train"]  # type: ignore[attr-defined]
    known = {opt for param in train.params for opt in param.opts + param.secondary_opts}
    flags = [a for a in args if a.startswith("--")]
    assert flags, args
    unknown = [f for f in flags if f.split("=")[0] not in known]
    assert not unknown, f"framecast train has no {unknown}"


# -- submission helpers --------------------------------------------------------------------------


def test_split_submit_args_reads_the_submission_flags_beside_the_train_flags():
    # The CLI parses train's flags (TrainConfig's fields) itself and passes them on as is.
    options = submit.split_submit_args(
        "127.0.0.1:8265",
        ["--pip=none", "--env", "A=1", "--no-follow", "--submission-id", "run-1"],
        ["--model", "optimized_cnn", "--epochs", "2"],
    )
    assert options.address == "http://127.0.0.1:8265"
    assert options.pip == "none"
    assert options.env == {"A": "1"}
    assert options.follow is False
    assert options.submission_id == "run-1"
    assert options.train_args == ["--model", "optimized_cnn", "--epochs", "2"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--env", "novalue"], "KEY=VALUE"),
        (["--pip"], "needs a value"),
        (["--entrypoint-num-cpus", "many"], "not a number"),
        (["--epoch", "2"], "no such option '--epoch'"),
    ],
)
def test_split_submit_args_rejects_bad_flags(args: list[str], message: str):
    with pytest.raises(submit.SubmitError, match=message):
        submit.split_submit_args("http://h:8265", args)


@pytest.mark.parametrize("address", ["ray://head:10001", "", "grpc://x"])
def test_normalize_address_refuses_non_http(address: str):
    with pytest.raises(submit.SubmitError):
        submit.normalize_address(address)


def test_relative_out_is_made_absolute_locally_and_refused_remotely(tmp_path: Path):
    local = submit.SubmitOptions("http://127.0.0.1:8265", ["--out", "art", "--epochs", "1"])
    assert submit.prepare_train_args(local, cwd=tmp_path) == [
        "--out",
        str(tmp_path / "art"),
        "--epochs",
        "1",
    ]
    remote = submit.SubmitOptions("http://ray-head.example:8265", ["--out=art"])
    with pytest.raises(submit.SubmitError, match="relative"):
        submit.prepare_train_args(remote)
    shared = submit.SubmitOptions("http://ray-head.example:8265", ["--out=/mnt/artifacts/a"])
    assert submit.prepare_train_args(shared) == ["--out=/mnt/artifacts/a"]
    with pytest.raises(submit.SubmitError, match="--out"):
        submit.prepare_train_args(submit.SubmitOptions("http://127.0.0.1:1", ["--epochs", "1"]))


def test_runtime_env_pins_pip_only_for_remote_clusters_and_never_ray(tmp_path: Path):
    local = submit.build_runtime_env(submit.SubmitOptions("http://localhost:8265", []))
    assert "pip" not in local
    assert local["working_dir"] == str(submit.REPO_ROOT)
    assert ".venv/" in local["excludes"] and ".framecast/" in local["excludes"]
    remote = submit.build_runtime_env(submit.SubmitOptions("https://ray.example", []))
    packages = remote["pip"]["packages"]
    lock = (REPO / "requirements.lock").read_text(encoding="utf-8")
    assert "tensorflow==" in " ".join(packages)
    assert all("==" in p for p in packages)
    assert not any(p.lower().startswith(("ray==", "ray[")) for p in packages)
    assert len(packages) >= len([ln for ln in lock.splitlines() if "==" in ln]) - 1
    reqs = tmp_path / "r.txt"
    reqs.write_text("# pinned\nnumpy==2.4.6\nray[serve]==2.60.0\n", encoding="utf-8")
    explicit = submit.build_runtime_env(
        submit.SubmitOptions("http://127.0.0.1:1", [], pip=str(reqs))
    )
    assert explicit["pip"]["packages"] == ["numpy==2.4.6"]
    with pytest.raises(submit.SubmitError, match="no such"):
        submit.build_runtime_env(
            submit.SubmitOptions("http://127.0.0.1:1", [], pip=str(tmp_path / "missing"))
        )


def test_local_jobs_run_with_this_interpreter_remote_ones_with_the_nodes_python():
    import sys

    assert submit.job_python(submit.SubmitOptions("http://127.0.0.1:1", [])) == sys.executable
    assert submit.job_python(submit.SubmitOptions("http://ray.example:8265", [])) == "python"
    entry = submit.train_entrypoint(["--out", "/a b"], "python")
    assert shlex.split(entry) == ["python", "-m", "cluster.cli", "train", "--out", "/a b"]


def test_auth_token_is_found_where_ray_looks(tmp_path: Path):
    assert submit.auth_token({"RAY_AUTH_TOKEN": " t1 "}, home=tmp_path) == "t1"
    path = tmp_path / "tok"
    path.write_text("t2\n", encoding="utf-8")
    assert submit.auth_token({"RAY_AUTH_TOKEN_PATH": str(path)}, home=tmp_path) == "t2"
    assert submit.auth_token({}, home=tmp_path) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t3", encoding="utf-8")
    assert submit.auth_token({}, home=tmp_path) == "t3"
    head_token = tmp_path / "head_token"
    head_token.write_text("t4", encoding="utf-8")  # framecast's own local head wins over ~/.ray
    assert submit.auth_token({}, home=tmp_path, local_head_token=head_token) == "t4"
    assert submit.auth_token({"RAY_AUTH_TOKEN": "t1"}, tmp_path, head_token) == "t1"
    assert submit.auth_token({}, tmp_path, tmp_path / "absent") == "t3"


def test_job_book_remembers_where_each_job_went(tmp_path: Path):
    book = submit.JobBook(tmp_path)
    book.record("raysubmit_1", {"address": "http://10.0.0.1:8265", "artifact": "/a"})
    assert book.address_of("raysubmit_1") == "http://10.0.0.1:8265"
    assert submit.resolve_address("raysubmit_1", book, ["http://other:1"]) == (
        "http://10.0.0.1:8265"
    )
    assert submit.resolve_address("raysubmit_2", book, [None, "127.0.0.1:6379", "http://h:2"]) == (
        "http://h:2"
    )
    with pytest.raises(submit.SubmitError, match="RAY_ADDRESS"):
        submit.resolve_address("raysubmit_3", book, [None, "10.0.0.1:6379"])

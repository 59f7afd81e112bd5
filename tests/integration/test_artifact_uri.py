"""Artifacts by URI (issue 20 item 4): the real pyarrow S3 client against a real S3-compatible
HTTP server (moto's server mode, a subprocess on a free port), a real local Ray head and Serve.

`serve deploy s3://...` as a user runs it (AWS credentials in the environment), a tampered
object refused by the driver and by the replicas' fetch, the per-node cache, `file://`, bad
URIs and settings refused at start-up naming the field, the secret in no output, status or
Ray log, and `train --out s3://...`.
"""

from __future__ import annotations

import contextlib
import io
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image
from ray import serve

from cluster.processes import free_port
from cluster.ray_head import RayHeadInfo
from serving.artifacts import ArtifactError, load_artifact
from serving.config import ServeSettings, StorageSettings
from serving.deploy import deploy
from serving.fashion_mnist import load_fashion_mnist
from serving.storage import cache_key, check_out, fetch, parse_location, verify_remote
from streams.config import KafkaSettings
from tests.conftest import SHIPPED_MODEL, LocalCluster, run_cli

BUCKET = "framecast-models"
REGION = "us-east-1"
ACCESS_KEY = "AKIA" + secrets.token_hex(8).upper()
SECRET_KEY = "sk-" + secrets.token_urlsafe(30)


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3-compatible server (`python -m moto.server`) on a free port, with a bucket."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{endpoint}/moto-api/", timeout=2).status_code < 500:
                    break
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "moto server did not answer within 60 s"
            time.sleep(0.2)
        admin_fs(endpoint).create_dir(BUCKET)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def admin_fs(endpoint: str) -> pafs.S3FileSystem:
    """The test's own S3 client (what puts and tampers objects is not the code under test)."""
    return pafs.S3FileSystem(
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        endpoint_override=endpoint.removeprefix("http://"),
        scheme="http",
        region=REGION,
        allow_bucket_creation=True,
    )


def user_env(endpoint: str, cache: Path) -> dict[str, str]:
    """The standard AWS variables a user has, plus this test's replica cache directory."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": REGION,
        "FRAMECAST_STORAGE_CACHE_DIR": str(cache),
    }


def storage(endpoint: str, cache: Path) -> StorageSettings:
    return StorageSettings(
        endpoint_override=endpoint,
        region=REGION,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        cache_dir=str(cache),
    )


def put_artifact(endpoint: str, prefix: str, source: Path = SHIPPED_MODEL) -> str:
    """Upload an artifact directory with the test's own client; return its URI."""
    pafs.copy_files(
        str(source), f"{BUCKET}/{prefix}", destination_filesystem=admin_fs(endpoint)
    )
    return f"s3://{BUCKET}/{prefix}/"


def tamper(endpoint: str, key: str) -> None:
    """Flip one byte of an object, keeping its size (only the sha256 can tell)."""
    fs = admin_fs(endpoint)
    with fs.open_input_stream(f"{BUCKET}/{key}") as stream:
        data = bytearray(stream.read())
    data[len(data) // 2] ^= 0xFF
    with fs.open_output_stream(f"{BUCKET}/{key}") as stream:
        stream.write(bytes(data))


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def deploy_args(uri: str, name: str, port: int) -> list[str]:
    return [
        "serve", "deploy", uri, "--name", name, "--http-port", str(port),
        "--num-cpus", "0.5", "--min-replicas", "1", "--max-replicas", "1",
    ]


def test_serve_deploy_s3_via_the_cli_classifies_and_keeps_the_secret(
    s3_endpoint: str,
    serve_port: int,
    ray_head: RayHeadInfo,
    ray_cluster: LocalCluster,
    kafka_settings: KafkaSettings,
    tmp_path: Path,
) -> None:
    uri = put_artifact(s3_endpoint, "fashion/v1")
    cache = tmp_path / "cache"
    env = {**user_env(s3_endpoint, cache), "RAY_ADDRESS": ray_head.address}
    try:
        result = run_cli(*deploy_args(uri, "s3app", serve_port), home=tmp_path, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "s3app" in result.stdout and "healthy" in result.stdout
        # The replica fetched it into its cache, keyed by URI + manifest sha256, verified.
        manifest_bytes = (SHIPPED_MODEL / "manifest.json").read_bytes()
        location = parse_location(uri)
        assert not isinstance(location, str)
        entry = cache / cache_key(location, manifest_bytes)
        assert load_artifact(entry).manifest.name
        assert [p.name for p in cache.iterdir()] == [entry.name]  # no staging dir left
        images, labels = load_fashion_mnist("test", limit=8)
        correct = 0
        for image, label in zip(images, labels, strict=True):
            answer = httpx.post(
                f"http://127.0.0.1:{serve_port}/s3app/classify",
                content=png(image),
                headers={"content-type": "image/png"},
                timeout=60,
            )
            assert answer.status_code == 200, answer.text
            correct += int(answer.json()["class_id"] == int(label))
        assert correct >= 6  # the shipped model: ~90 % on the test split
        # The secret in no output: the deploy's, `status --json`'s, `serve status`'s.
        status = run_cli(
            "--bootstrap-servers", str(kafka_settings.bootstrap_servers),
            "status", "--json", home=tmp_path, env=env,
        )
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["settings"]["storage"]["access_key"] == "**********"
        assert report["settings"]["storage"]["secret_key"] == "**********"
        serve_status = run_cli("serve", "status", "--json", home=tmp_path, env=env)
        assert serve_status.returncode == 0, serve_status.stderr
        assert "s3app" in serve_status.stdout
        for output in (result, status, serve_status):
            assert SECRET_KEY not in output.stdout + output.stderr
            assert ACCESS_KEY not in output.stdout + output.stderr
        assert SECRET_KEY not in str(serve.status())
        needle = SECRET_KEY.encode()
        scanned = 0
        # Every node's logs: a replica on a worker node logs under that node's temp dir.
        for path in (p for d in ray_cluster.temp_dirs() for p in d.rglob("*")):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 256 << 20:
                with contextlib.suppress(OSError):
                    assert needle not in path.read_bytes(), path
                    scanned += 1
        assert scanned > 10  # Ray's logs were there to look at
    finally:
        with contextlib.suppress(Exception):
            serve.delete("s3app")


def test_a_tampered_object_is_refused_by_the_driver_naming_it(
    s3_endpoint: str, serve_port: int, ray_head: RayHeadInfo, tmp_path: Path
) -> None:
    uri = put_artifact(s3_endpoint, "fashion/tampered")
    tamper(s3_endpoint, "fashion/tampered/model.tflite")
    env = {**user_env(s3_endpoint, tmp_path / "cache"), "RAY_ADDRESS": ray_head.address}
    result = run_cli(*deploy_args(uri, "tampered", serve_port), home=tmp_path, env=env)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "model.tflite" in output and "does not match its manifest" in output, output
    assert "Traceback" not in output
    assert "tampered" not in serve.status().applications  # nothing was sent
    assert not (tmp_path / "cache").exists()  # the driver keeps no file


def test_the_replicas_fetch_refuses_a_tampered_object_and_keeps_nothing(
    s3_endpoint: str, tmp_path: Path
) -> None:
    settings = storage(s3_endpoint, tmp_path / "cache")
    uri = parse_location(put_artifact(s3_endpoint, "fashion/fetched"))
    assert not isinstance(uri, str)
    first = fetch(uri, settings)  # what a replica runs
    assert first.manifest.name and first.read_bytes("model.tflite")
    # A cached copy that no longer verifies is removed and fetched again.
    (first.directory / "metrics.json").write_bytes(b"{}")
    again = fetch(uri, settings)
    assert again.directory == first.directory
    assert again.read_bytes("metrics.json") == (SHIPPED_MODEL / "metrics.json").read_bytes()
    # A tampered object: refused, named, and no copy of it kept.
    tamper(s3_endpoint, "fashion/fetched/saved_model/saved_model.pb")
    with pytest.raises(ArtifactError, match=r"saved_model/saved_model\.pb"):
        verify_remote(uri, settings)
    cache = tmp_path / "cache2"
    with pytest.raises(ArtifactError, match=r"saved_model/saved_model\.pb"):
        fetch(uri, storage(s3_endpoint, cache))
    assert list(cache.iterdir()) == []
    # An unlisted extra object is refused too.
    extra = parse_location(put_artifact(s3_endpoint, "fashion/extra"))
    assert not isinstance(extra, str)
    with admin_fs(s3_endpoint).open_output_stream(f"{BUCKET}/fashion/extra/evil.py") as out:
        out.write(b"print('hi')")
    with pytest.raises(ArtifactError, match=r"unlisted file 'evil\.py'"):
        verify_remote(extra, settings)


def test_file_uri_deploys_like_a_directory(serve_port: int, served_artifact: Path) -> None:
    settings = ServeSettings(
        app_name="fileuri", route_prefix="/fileuri", http_port=serve_port, num_cpus=0.5,
        min_replicas=1, max_replicas=1,
    )
    try:
        result = deploy(
            served_artifact.as_uri(), settings, address=None, namespace="framecast-tests",
            timeout_s=240,
        )
        assert result["model"]["name"] == load_artifact(served_artifact).manifest.name
        health = httpx.get(f"http://127.0.0.1:{serve_port}/fileuri/healthz", timeout=30)
        assert health.status_code == 200
    finally:
        with contextlib.suppress(Exception):
            serve.delete("fileuri")


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["serve", "deploy", "ftp://bucket/model/"], {}, "artifact ftp://bucket/model/"),
        (["serve", "deploy", f"s3://AK:{SECRET_KEY}@bucket/m/"], {}, "credentials do not go"),
        (["serve", "deploy", f"s3://bucket/m/?secret_key={SECRET_KEY}"], {}, "options do not go"),
        (["serve", "deploy", "s3://bucket/m/"], {"AWS_ENDPOINT_URL": "ftp://x:1"},
         "storage.endpoint_override"),
        (["serve", "deploy", "s3://bucket/m/"], {"FRAMECAST_STORAGE_SECRET_KEY": SECRET_KEY},
         "access_key and secret_key go together"),
        (["train", "--model", "optimized_cnn", "--dataset", "synthetic", "--epochs", "1",
          "--out", "gopher://host/x"], {}, "--out gopher://host/x"),
    ],
    ids=["scheme", "userinfo", "query", "endpoint", "half-keys", "train-out"],
)
def test_bad_uris_and_storage_settings_fail_at_start_up_naming_the_field(
    args: list[str], env: dict[str, str], named: str, tmp_path: Path
) -> None:
    # No Ray, no broker: these fail before either is touched.
    result = run_cli(*args, home=tmp_path, env={"RAY_ADDRESS": "127.0.0.1:1", **env}, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert named in output, output
    assert SECRET_KEY not in output
    assert "Traceback" not in output


def test_train_out_s3_uploads_a_verified_artifact(
    s3_endpoint: str, serve_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobs.config import TrainConfig
    from jobs.train import train_artifact

    for key, value in user_env(s3_endpoint, tmp_path / "cache").items():
        monkeypatch.setenv(key, value)
    uri = f"s3://{BUCKET}/trained/tiny/"
    config = TrainConfig(
        model="optimized_cnn",
        dataset="synthetic",
        epochs=1,
        out=uri,
        limit=128,
        test_limit=64,
        workers=1,
        cpus_per_worker=1,
        batch_size=32,
        storage_path=str(tmp_path / "ray"),
        augment=False,
    )
    metrics = train_artifact(config)  # on the session head, through this process's driver
    assert metrics["samples"] == 64
    location = parse_location(uri)
    assert not isinstance(location, str)
    manifest = verify_remote(location, storage(s3_endpoint, tmp_path / "cache"))
    assert manifest.training.epochs == 1 and "model.tflite" in manifest.files
    # The same prefix takes a new artifact (it holds one); a prefix with other objects not.
    check_out(uri, storage(s3_endpoint, tmp_path / "cache"))
    with admin_fs(s3_endpoint).open_output_stream(f"{BUCKET}/other/data.csv") as out:
        out.write(b"a,b\n")
    refused = run_cli(
        "train", "--model", "optimized_cnn", "--dataset", "synthetic", "--epochs", "1",
        "--out", f"s3://{BUCKET}/other/", home=tmp_path,
        env=user_env(s3_endpoint, tmp_path / "cache"), timeout=120,
    )
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "refusing to overwrite" in refused.stdout + refused.stderr

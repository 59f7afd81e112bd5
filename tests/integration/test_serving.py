"""The Serve application on a real local Ray: labels, bad input, backpressure, hot swap, and
the HTTP endpoint's guards (chunked bodies, the bearer token, docs, slow clients, timeouts)."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import select
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image
from ray import serve

from cluster.ray_head import RayHeadInfo
from serving.app import MAX_REQUEST_BYTES
from serving.artifacts import ArtifactError, load_artifact, read_manifest, write_manifest
from serving.config import ServeSettings
from serving.deploy import deploy
from serving.fashion_mnist import load_fashion_mnist
from serving.frames import ARROW_CONTENT_TYPE, FrameRecord, encode_frames
from serving.results import ClassifyResult, FrameError
from serving.runtimes import LiteRTRuntime
from tests.reliability.conftest import Replicas, peak_rss_mb, reliability_settings


@pytest.fixture(scope="module")
def artifact(served_artifact: Path) -> Path:
    return served_artifact


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    return load_fashion_mnist("test", limit=48)


def settings_for(port: int, name: str, **overrides: Any) -> ServeSettings:
    settings: ServeSettings = reliability_settings(port, name, **overrides)
    return settings


@pytest.fixture(scope="module")
def app_url(serve_port: int, artifact: Path) -> Iterator[str]:
    settings = settings_for(serve_port, "main")
    deploy(artifact, settings, address=None, namespace="framecast-tests", timeout_s=240)
    yield f"http://127.0.0.1:{serve_port}/main"
    serve.delete("main")


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def raw_frames(images: np.ndarray) -> list[FrameRecord]:
    return [
        FrameRecord(
            stream_id="cam",
            frame_index=i,
            captured_at_ns=0,
            encoding="raw",
            height=28,
            width=28,
            channels=1,
            data=img.tobytes(),
        )
        for i, img in enumerate(images)
    ]


def test_http_and_handle_labels_equal_direct_litert(
    app_url: str, artifact: Path, images: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = images
    direct = LiteRTRuntime(artifact / "model.tflite").predict(x[:, :, :, None] / np.float32(255))
    expected = direct.argmax(axis=1).tolist()

    over_http = [
        httpx.post(
            f"{app_url}/classify",
            content=png(img),
            headers={"content-type": "image/png"},
            timeout=60,
        ).json()["class_id"]
        for img in x[:12]
    ]
    assert over_http == expected[:12]

    response = httpx.post(
        f"{app_url}/classify",
        content=encode_frames(raw_frames(x)),
        headers={"content-type": ARROW_CONTENT_TYPE},
        timeout=60,
    )
    assert response.status_code == 200
    batch = response.json()
    assert [r["class_id"] for r in batch] == expected
    assert batch[0]["model"]["name"] == read_manifest(artifact).name
    assert len(batch[0]["topk"]) == 3
    np.testing.assert_allclose([r["score"] for r in batch], direct.max(axis=1), atol=1e-6)

    handle = serve.get_app_handle("main")
    results = handle.classify_frames.remote(raw_frames(x)).result(timeout_s=60)
    assert all(isinstance(r, ClassifyResult) for r in results)
    assert [r.class_id for r in results] == expected


def _jpeg(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (*size, 3), dtype=np.uint8)).save(
        buffer, format="JPEG"
    )
    return buffer.getvalue()


BAD_INPUTS = {
    "garbage": (b"\x00\x01garbage" * 50, "image/jpeg", 400, "undecodable"),
    "truncated_jpeg": (_jpeg((64, 64))[:400], "image/jpeg", 400, "undecodable"),
    "bomb": (png(np.zeros((5000, 5000), dtype=np.uint8)), "image/png", 413, "too_many_pixels"),
    "oversized": (b"\xff\xd8" + b"\x00" * (9 * 1024 * 1024), "image/jpeg", 413, "too_large"),
    "wrong_type": (b"hello", "text/plain", 415, "unsupported_format"),
    "bad_arrow": (b"not arrow at all", ARROW_CONTENT_TYPE, 400, "bad_arrow"),
    "wrong_dimensions": (
        encode_frames(
            [
                FrameRecord(
                    stream_id="cam",
                    frame_index=0,
                    captured_at_ns=0,
                    encoding="raw",
                    height=28,
                    width=28,
                    channels=1,
                    data=b"\x00" * 100,
                )
            ]
        ),
        ARROW_CONTENT_TYPE,
        422,
        "bad_dimensions",
    ),
}


def test_replica_threads_run_at_the_configured_niceness(
    app_url: str, ray_head: RayHeadInfo
) -> None:
    from ray.util.state import list_actors

    actors = list_actors(
        address=ray_head.dashboard_url,
        filters=[("class_name", "=", "ServeReplica:main:Classifier"), ("state", "=", "ALIVE")],
    )
    pids = [int(actor.pid) for actor in actors if actor.pid]
    assert pids, "no live replica of the app"
    for pid in pids:
        tids = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
        niceness = {tid: os.getpriority(os.PRIO_PROCESS, tid) for tid in tids}
        # Ray starts its workers at 15; the default ServeSettings.replica_niceness is 0.
        assert set(niceness.values()) == {0}, niceness


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_4xx_with_reason_and_replica_stays_healthy(app_url: str, case: str) -> None:
    body, content_type, status, reason = BAD_INPUTS[case]
    response = httpx.post(
        f"{app_url}/classify", content=body, headers={"content-type": content_type}, timeout=60
    )
    assert response.status_code == status, response.text
    assert response.json()["error"] == reason
    assert response.json()["detail"]
    health = httpx.get(f"{app_url}/healthz", timeout=30)
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert (health.json()["model"]["runtime"], health.json()["model"]["precision"]) == (
        "litert",
        "int8",
    )


def test_bad_frames_in_a_batch_get_per_frame_errors(
    app_url: str, images: tuple[np.ndarray, np.ndarray]
) -> None:
    frames = raw_frames(images[0][:3])
    frames[1] = FrameRecord(
        stream_id="cam",
        frame_index=1,
        captured_at_ns=0,
        encoding="jpeg",
        height=0,
        width=0,
        channels=0,
        data=b"not a jpeg",
    )
    results = serve.get_app_handle("main").classify_frames.remote(frames).result(timeout_s=60)
    assert isinstance(results[0], ClassifyResult) and isinstance(results[2], ClassifyResult)
    assert results[1] == FrameError("undecodable", results[1].detail)


def test_saturation_answers_503_with_retry_after_not_a_hang(
    serve_port: int, artifact: Path, images: tuple[np.ndarray, np.ndarray]
) -> None:
    settings = settings_for(serve_port, "tight", max_ongoing_requests=1, max_queued_requests=1)
    deploy(artifact, settings, address=None, namespace="framecast-tests", timeout_s=240)
    url = f"http://127.0.0.1:{serve_port}/tight/classify"
    body = encode_frames(raw_frames(np.repeat(images[0], 40, axis=0)))  # ~1900 frames per call

    def call(_: int) -> httpx.Response:
        return httpx.post(
            url, content=body, headers={"content-type": ARROW_CONTENT_TYPE}, timeout=120
        )

    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(call, range(16)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1, codes
    assert codes.count(200) >= 1, codes
    assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)

    handle = serve.get_app_handle("tight")
    from ray.serve.exceptions import BackPressureError

    pending = [
        handle.classify_frames.remote(raw_frames(np.repeat(images[0], 40, axis=0)))
        for _ in range(8)
    ]
    outcomes = []
    for response in pending:
        try:
            outcomes.append(len(response.result(timeout_s=120)))
        except BackPressureError:
            outcomes.append("backpressure")
    assert "backpressure" in outcomes
    serve.delete("tight")


def test_tampered_artifact_is_refused_before_deploying(
    serve_port: int, artifact: Path, tmp_path: Path
) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(artifact, tampered)
    model = tampered / "model.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        deploy(
            tampered,
            settings_for(serve_port, "tampered"),
            address=None,
            namespace="framecast-tests",
        )
    assert "tampered" not in serve.status().applications


def test_hot_swap_under_load_fails_no_request(
    app_url: str, serve_port: int, artifact: Path, images: tuple[np.ndarray, np.ndarray]
) -> None:
    v2 = artifact.parent / "v2"
    shutil.copytree(artifact, v2)
    manifest = read_manifest(v2)
    write_manifest(v2, manifest.model_copy(update={"version": manifest.version + "-v2"}))
    load_artifact(v2)

    stop = threading.Event()
    failures: list[str] = []
    versions: list[str] = []
    body = png(images[0][0])

    def load() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                r = client.post(
                    f"{app_url}/classify", content=body, headers={"content-type": "image/png"}
                )
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                else:
                    versions.append(r.json()["model"]["version"])

    workers = [threading.Thread(target=load) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(1.0)
        deploy(
            v2,
            settings_for(serve_port, "main"),
            address=None,
            namespace="framecast-tests",
            timeout_s=240,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not versions or not versions[-1].endswith("-v2")):
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert failures == []
    assert versions[0] == manifest.version
    assert versions[-1] == manifest.version + "-v2"
    assert json.loads(httpx.get(f"{app_url}/healthz").text)["model"]["version"].endswith("-v2")


def _scrape_ray_metrics() -> str:
    """The Prometheus text that this Ray node's metrics agent exports."""
    import ray

    texts = []
    for node in ray.nodes():
        if node.get("Alive") and node.get("MetricsExportPort"):
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            texts.append(httpx.get(url, timeout=30).text)
    return "\n".join(texts)


def _metric_total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of metric name whose labels include the given ones."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_prometheus_metrics_count_frames_batches_time_and_errors(
    app_url: str, images: tuple[np.ndarray, np.ndarray]
) -> None:
    before = _scrape_ray_metrics()
    app = "main"
    classified_before = _metric_total(
        before, "ray_framecast_frames_total", outcome="classified", application=app
    )
    undecodable_before = _metric_total(
        before, "ray_framecast_errors_total", reason="undecodable", application=app
    )
    frames = raw_frames(images[0][:16])
    response = httpx.post(
        f"{app_url}/classify",
        content=encode_frames(frames),
        headers={"content-type": ARROW_CONTENT_TYPE},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    bad = httpx.post(
        f"{app_url}/classify",
        content=b"\xff\xd8\xff\xe0 truncated",
        headers={"content-type": "image/jpeg"},
        timeout=60,
    )
    assert bad.status_code == 400
    # Ray's metrics agent exports every few seconds: poll until the new counts show.
    deadline = time.monotonic() + 90
    while True:
        text = _scrape_ray_metrics()
        classified = _metric_total(
            text, "ray_framecast_frames_total", outcome="classified", application=app
        )
        undecodable = _metric_total(
            text, "ray_framecast_errors_total", reason="undecodable", application=app
        )
        if (classified - classified_before >= 16 and undecodable - undecodable_before >= 1) or (
            time.monotonic() > deadline
        ):
            break
        time.sleep(2)
    assert classified - classified_before >= 16
    assert undecodable - undecodable_before >= 1
    assert _metric_total(text, "ray_framecast_batch_size_count", application=app) >= 1
    assert _metric_total(text, "ray_framecast_inference_ms_count", application=app) >= 1
    assert _metric_total(text, "ray_framecast_inference_ms_bucket", le="+Inf", application=app) > 0


# -- issue 17, class 7: the HTTP endpoint -----------------------------------------------------


def chunked_post(
    port: int, path: str, total: int, chunk: int = 1 << 20, content_type: str = "image/png"
) -> tuple[int, dict[str, Any], int]:
    """POST ``total`` bytes with Transfer-Encoding: chunked (no Content-Length), as a raw
    socket client that stops sending once an answer arrives: (status, JSON body, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    try:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        framed = f"{chunk:x}\r\n".encode() + b"\x00" * chunk + b"\r\n"
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < total and not select.select([sock], [], [], 0)[0]:
                sock.sendall(framed)
                sent += chunk
            if sent >= total:
                sock.sendall(b"0\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read()), sent
    finally:
        sock.close()


def _replica_pid(ray_head: RayHeadInfo, app: str) -> int:
    (pid,) = Replicas(ray_head.dashboard_url).pids(app)
    return pid


def _reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def _rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def test_a_chunked_body_over_the_limit_is_refused_413_without_the_replica_growing_by_it(
    app_url: str, serve_port: int, ray_head: RayHeadInfo
) -> None:
    pid = _replica_pid(ray_head, "main")
    _reset_peak_rss(pid)
    before = _rss_mb(pid)
    body_mib = 2048  # the replica must not grow by anything near it (it stops at 64 MiB)
    status, answer, sent = chunked_post(serve_port, "/main/classify", body_mib << 20)
    growth = peak_rss_mb(pid) - before
    print(f"chunked {body_mib} MiB: 413 after {sent >> 20} MiB sent, replica +{growth:.0f} MiB")
    assert (status, answer["error"]) == (413, "too_large"), answer
    assert sent < body_mib << 20  # refused before the client had sent it all
    # The replica stops at MAX_REQUEST_BYTES and answers; what it holds is that plus what
    # Ray's proxy forwarded while it counted (Ray pulls a body into the replica whether or
    # not the app reads it: docs/serving.md), not the body's size.
    assert sent > MAX_REQUEST_BYTES
    assert growth < body_mib / 2, growth
    assert httpx.get(f"{app_url}/healthz", timeout=30).status_code == 200


def test_docs_and_openapi_are_off_by_default(app_url: str) -> None:
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(f"{app_url}{path}", timeout=30).status_code == 404, path


TOKEN = "test-token-" + "k" * 24


@pytest.fixture(scope="module")
def guarded_url(serve_port: int, artifact: Path) -> Iterator[str]:
    """An app with a bearer token, the docs on, and 4 slots of which HTTP may take 2."""
    settings = settings_for(
        serve_port, "guarded", http_token=TOKEN, http_docs=True, max_ongoing_requests=4
    )
    assert settings.http_concurrency == 2
    deploy(artifact, settings, address=None, namespace="framecast-tests", timeout_s=240)
    yield f"http://127.0.0.1:{serve_port}/guarded"
    serve.delete("guarded")


def test_a_token_guards_classify_but_not_healthz(
    guarded_url: str, images: tuple[np.ndarray, np.ndarray]
) -> None:
    body = png(images[0][0])

    def post(**headers: str) -> httpx.Response:
        return httpx.post(
            f"{guarded_url}/classify",
            content=body,
            headers={"content-type": "image/png", **headers},
            timeout=60,
        )

    missing, wrong, right = post(), post(authorization="Bearer " + TOKEN[:-1] + "x"), None
    for refused in (missing, wrong, post(authorization=TOKEN)):  # not a Bearer
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"] == "unauthorized"
        assert refused.headers["www-authenticate"].startswith("Bearer")
    right = post(authorization=f"Bearer {TOKEN}")
    assert right.status_code == 200, right.text
    assert right.json()["class_id"] in range(10)
    assert wrong.status_code == 401
    assert httpx.get(f"{guarded_url}/healthz", timeout=30).status_code == 200
    # Docs on for this app (serve.http_docs), and they describe /classify.
    assert "/classify" in httpx.get(f"{guarded_url}/openapi.json", timeout=30).json()["paths"]
    assert httpx.get(f"{guarded_url}/docs", timeout=30).status_code == 200


def test_the_token_is_in_no_log_and_no_status(guarded_url: str, ray_head: RayHeadInfo) -> None:
    from serving.deploy import status

    httpx.post(  # a refused and an accepted request first, so that both were logged
        f"{guarded_url}/classify", content=b"x", headers={"authorization": f"Bearer {TOKEN}x"}
    )
    assert TOKEN not in str(serve.status())
    assert TOKEN not in json.dumps(status(address=None, namespace="framecast-tests"))
    needle = TOKEN.encode()
    scanned = 0
    head_dir = Path(ray_head.temp_dir)  # and the worker nodes' (<head dir>-w<i>)
    for path in (p for d in head_dir.parent.glob(f"{head_dir.name}*") for p in d.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 256 << 20:
            with contextlib.suppress(OSError):
                assert needle not in path.read_bytes(), path
                scanned += 1
    assert scanned > 10  # Ray's logs were there to look at


def _slow_png(body: bytes, release: threading.Event) -> Iterator[bytes]:
    """A PNG upload that stalls after its first bytes until released (a slow client)."""
    yield body[:16]
    release.wait(120)
    yield body[16:]


def test_slow_uploads_cannot_starve_the_streams_handle_calls(
    guarded_url: str, images: tuple[np.ndarray, np.ndarray]
) -> None:
    body = png(images[0][0])
    release = threading.Event()
    headers = {"content-type": "image/png", "authorization": f"Bearer {TOKEN}"}

    def upload(_: int) -> tuple[int, str | None]:
        response = httpx.post(
            f"{guarded_url}/classify",
            content=_slow_png(body, release),
            headers=headers,
            timeout=180,
        )
        return response.status_code, response.headers.get("retry-after")

    with ThreadPoolExecutor(max_workers=6) as pool:
        uploads = [pool.submit(upload, i) for i in range(6)]
        try:
            # Wait until the replica holds as many slow uploads as HTTP may (2 of its 4).
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                health = httpx.get(f"{guarded_url}/healthz", timeout=30).json()
                if health["http"]["ongoing"] >= health["http"]["limit"]:
                    break
                time.sleep(0.2)
            assert health["http"] == {"ongoing": 2, "limit": 2}, health
            # The stream's handle call still finds a slot while the uploads hang.
            frames = raw_frames(images[0][:8])
            answers = serve.get_app_handle("guarded").classify_frames.remote(frames)
            assert all(isinstance(a, ClassifyResult) for a in answers.result(timeout_s=60))
        finally:
            release.set()
        outcomes = [future.result() for future in uploads]
    codes = [code for code, _ in outcomes]
    assert codes.count(200) == 2 and codes.count(503) == 4, outcomes
    assert all(retry == "1" for code, retry in outcomes if code == 503), outcomes


def test_an_upload_slower_than_the_request_timeout_gets_408(
    guarded_url: str, serve_port: int, artifact: Path, images: tuple[np.ndarray, np.ndarray]
) -> None:
    settings = settings_for(
        serve_port,
        "guarded",
        http_token=TOKEN,
        http_docs=True,
        max_ongoing_requests=4,
        http_request_timeout_s=2,
    )
    deploy(artifact, settings, address=None, namespace="framecast-tests", timeout_s=240)
    release = threading.Event()
    timer = threading.Timer(8, release.set)  # 4x the timeout: the replica gave up long before
    timer.start()
    response = httpx.post(
        f"{guarded_url}/classify",
        content=_slow_png(png(images[0][0]), release),
        headers={"content-type": "image/png", "authorization": f"Bearer {TOKEN}"},
        timeout=120,
    )
    timer.join()
    assert response.status_code == 408, response.text
    assert response.json()["error"] == "request_timeout"
    fast = httpx.post(
        f"{guarded_url}/classify",
        content=png(images[0][0]),
        headers={"content-type": "image/png", "authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert fast.status_code == 200, fast.text

"""HTTP cameras: K cameras POSTing frames to Serve's /classify, a label per answer to Kafka.

The way Triton or KServe users work: each camera takes a frame of framecast's synthetic video
(streams.video, the frames `framecast produce` sends), encodes it as PNG - or, with
--frame-size WxH, takes the next frame of a pre-encoded RGB JPEG clip of that size
(cluster.bench.camera.camera_clip, the clip the Kafka cameras of `bench peers --frame-size`
loop: camera k starts k frames into it) - POSTs it at --fps
(0 = flat out, the next frame once the answer is back) and produces the answer to the labels
topic in the label contract's JSON, captured_at_ns being when the camera took the frame. A 503
(overloaded) is retried after its Retry-After, capped at 50 ms, up to 100 times. Runs in
framecast's .venv. Interface: peers/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import common  # peers/common.py: a script's own directory is on sys.path
import httpx
from confluent_kafka import KafkaError, Producer

from cluster.bench.camera import camera_clip, parse_frame_size
from streams.producers import encode_pixels
from streams.video import SyntheticSource

MAX_RETRIES = 100


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="http://HOST:PORT/ROUTE/classify")
    parser.add_argument("--bootstrap", required=True, help="HOST:PORT of a Kafka broker")
    parser.add_argument("--labels", required=True, help="the labels topic")
    parser.add_argument("--cameras", type=int, required=True)
    parser.add_argument("--fps", type=float, required=True, help="per camera; 0 = flat out")
    parser.add_argument("--per-camera", type=int, required=True, help="frames per camera")
    parser.add_argument("--token-env", help="environment variable holding Serve's HTTP token")
    parser.add_argument("--frame-size", help="WxH: POST RGB JPEG camera frames of that size "
                        "(default: the synthetic video's frames as PNG)")
    args = parser.parse_args()
    if args.cameras < 1 or args.per_camera < 1 or args.fps < 0:
        parser.error("--cameras and --per-camera must be >= 1, --fps >= 0")
    if args.frame_size is not None:
        try:
            args.frame_size = parse_frame_size(args.frame_size)
        except ValueError as error:
            parser.error(str(error))
    if args.token_env and not os.environ.get(args.token_env):
        parser.error(f"--token-env {args.token_env}: that variable is not set")
    return args


class Cameras:
    """The cameras, the HTTP client they share and the labels producer."""

    def __init__(self, args: argparse.Namespace, producer: Producer) -> None:
        self.args = args
        self.producer = producer
        self.source = SyntheticSource()
        self.clip: list[tuple[bytes, int | None]] = []
        if args.frame_size is not None:  # encoded once, before READY: cameras encode in hardware
            self.clip, _made_by = camera_clip(*args.frame_size)
        self.labelled = self.errors = self.retries = 0
        self.failed: list[str] = []
        self.headers = {"content-type": "image/jpeg" if self.clip else "image/png"}
        if args.token_env:
            self.headers["authorization"] = f"Bearer {os.environ[args.token_env]}"

    def _delivered(self, error: KafkaError | None, _message: Any) -> None:
        if error is None:
            self.labelled += 1
        else:
            self.failed.append(error.str())

    async def _post(self, client: httpx.AsyncClient, body: bytes) -> httpx.Response | None:
        for _ in range(MAX_RETRIES):
            response = await client.post(self.args.url, content=body, headers=self.headers)
            if response.status_code != 503:
                return response
            self.retries += 1
            retry_after = float(response.headers.get("retry-after", "0.05") or 0.05)
            await asyncio.sleep(min(retry_after, 0.05))
        return None

    def frames(self, k: int) -> Iterator[tuple[Any, int | None]]:
        """Camera k's frames with their ground truth: JPEG bytes of the clip, or the synthetic
        video's pixels (encoded as PNG once taken, as before)."""
        if not self.clip:
            yield from ((shot.pixels, shot.label) for shot in self.source.stream(k))
        for index in itertools.count():
            yield self.clip[(index + k) % len(self.clip)]

    async def camera(self, k: int, client: httpx.AsyncClient, start: float) -> None:
        args, loop = self.args, asyncio.get_running_loop()
        shots = self.frames(k)
        stream_id = f"cam-{k}"
        for index in range(args.per_camera):
            if args.fps > 0:
                await asyncio.sleep(max(0.0, start + (index + k / args.cameras) / args.fps
                                        - loop.time()))
            frame, truth = next(shots)
            captured_ns = time.time_ns()
            body = frame if self.clip else encode_pixels(frame, "png")
            sent = time.perf_counter()
            try:
                response = await self._post(client, body)
            except httpx.HTTPError as error:
                print(f"{stream_id} frame {index}: {type(error).__name__}", file=sys.stderr)
                self.errors += 1
                continue
            if response is None or response.status_code != 200:
                self.errors += 1
                continue
            answer = response.json()
            labeled_ns = time.time_ns()
            record = {
                "stream_id": stream_id,
                "frame_index": index,
                # No Kafka source: the camera and its frame stand in for partition and offset.
                "source": {"topic": "http", "partition": k, "offset": index, "row": 0},
                "status": "ok",
                "class_id": answer["class_id"],
                "label": answer["label"],
                "score": answer["score"],
                "model": {key: answer["model"].get(key) for key in ("name", "version", "sha256")},
                "captured_at_ns": captured_ns,
                "labeled_at_ns": labeled_ns,
                "timings_ms": {
                    "request": round((time.perf_counter() - sent) * 1e3, 3),
                    "inference": answer.get("inference_ms", 0.0),
                    "end_to_end": round((labeled_ns - captured_ns) / 1e6, 3),
                },
                "ground_truth": truth,
            }
            self._produce(stream_id, common.encode(record))

    def _produce(self, key: str, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(self.args.labels, value, key.encode(),
                                      on_delivery=self._delivered)
                break
            except BufferError:
                self.producer.poll(0.05)
        self.producer.poll(0)

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.args.cameras,
                              max_keepalive_connections=self.args.cameras)
        async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
            common.ready()
            start = asyncio.get_running_loop().time()
            await asyncio.gather(*(self.camera(k, client, start)
                                   for k in range(self.args.cameras)))


def main() -> None:
    args = arguments()
    producer = Producer({"bootstrap.servers": args.bootstrap, "enable.idempotence": True,
                         "linger.ms": 10, "partitioner": "murmur2_random"})
    producer.list_topics(timeout=30)  # fail now if Kafka is not there
    cameras = Cameras(args, producer)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop: flush, then the line
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(cameras.run())
    producer.flush(60)
    if cameras.failed:
        print(f"{len(cameras.failed)} labels not delivered: {cameras.failed[0]}", file=sys.stderr)
    common.finish(cameras.labelled, errors=cameras.errors, retries=cameras.retries)


if __name__ == "__main__":
    main()

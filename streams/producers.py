"""Frame producers (`framecast produce`): cameras that send frames to the ``frames`` topic.

A source (:mod:`streams.video`) gives each of ``streams`` cameras an endless iterator of
pixels; :func:`produce_frames` takes ``count`` frames from each, paced in real time at ``fps``
per camera (0 = as fast as possible), encodes them (jpeg | png | raw) and sends them with an
idempotent producer (acks=all), keyed by ``stream_id`` so that each camera stays in one
partition, in order. Messages follow the DESIGN contract, either

* ``arrow`` — an Arrow IPC stream of ``batch`` frame records of one camera, header
  ``content-type: application/vnd.apache.arrow.stream``; or
* ``bare`` — one JPEG/PNG per message, metadata in the headers ``content-type``,
  ``stream_id``, ``frame_index``, ``captured_at_ns`` and (when known) ``label``.

The cameras are interleaved by one scheduler thread (camera k's frame i is due at
``(i + k / streams) / fps`` seconds after the start); librdkafka (confluent-kafka) sends in
its own threads, outside the interpreter lock: at 1,000 one-frame messages a second it costs a
quarter of the CPU kafka-python did on the same machine (docs/BENCHMARKS.md).
``captured_at_ns`` is ``time.time_ns()`` when the frame is taken from the source; with
``batch > 1`` a camera's frames wait until its batch is full, which adds up to
``(batch - 1) / fps`` seconds to their end-to-end latency (use batches for throughput tests).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from streams.client import admin_client, rdkafka_callbacks, rdkafka_reason
from streams.config import KafkaSettings, TopicSettings
from streams.exceptions import (
    KafkaConnectionError,
    ProducerError,
    ProducerOptionError,
    SourceError,
    StreamsError,
)
from streams.frames import ARROW_CONTENT_TYPE, ENCODINGS, FrameRecord, encode_frames, warm_up
from streams.scene_source import (
    DEFAULT_CLIP_FRAMES,
    DEFAULT_SCENES_FRAME_SIZE,
    EncodedFrame,
    ScenesSource,
    is_scenes_source,
)
from streams.topics import apply_topic_specs, default_topic_specs
from streams.video import (
    DEFAULT_FRAME_SIZE,
    DEFAULT_HOLD_FRAMES,
    DEFAULT_MAX_SIDE,
    FrameSource,
    SourceFrame,
    open_source,
)

log = logging.getLogger(__name__)

MessageFormat = Literal["arrow", "bare"]
FORMATS = ("arrow", "bare")
IMAGE_CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}
ProgressCallback = Callable[[int], None]


def encode_pixels(pixels: np.ndarray, encoding: str, jpeg_quality: int = 90) -> bytes:
    """uint8 [H, W] or [H, W, 3] pixels as JPEG, PNG or raw (row-major H x W x C) bytes."""
    if encoding == "raw":
        return np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8))
    buffer = io.BytesIO()
    if encoding == "jpeg":
        image.save(buffer, format="JPEG", quality=jpeg_quality)
    elif encoding == "png":
        image.save(buffer, format="PNG", compress_level=1)
    else:
        raise ProducerOptionError(f"encoding {encoding!r} is not one of {', '.join(ENCODINGS)}")
    return buffer.getvalue()


def bare_headers(frame: FrameRecord) -> list[tuple[str, bytes]]:
    """Kafka headers of a bare-image message (DESIGN): content type and frame metadata."""
    headers = [
        ("content-type", IMAGE_CONTENT_TYPES[frame.encoding].encode()),
        ("stream_id", frame.stream_id.encode()),
        ("frame_index", str(frame.frame_index).encode()),
        ("captured_at_ns", str(frame.captured_at_ns).encode()),
    ]
    if frame.label is not None:
        headers.append(("label", str(frame.label).encode()))
    return headers


def check_options(
    *,
    fps: float,
    streams: int,
    count: int,
    encoding: str,
    message_format: str,
    batch: int,
    jpeg_quality: int = 90,
) -> None:
    """Refuse inconsistent producer options with a ProducerOptionError that says why."""
    problems = []
    if encoding not in ENCODINGS:
        problems.append(f"--encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
    if message_format not in FORMATS:
        problems.append(f"--format must be one of {', '.join(FORMATS)}, got {message_format!r}")
    if message_format == "bare" and encoding == "raw":
        problems.append("--format bare carries JPEG or PNG images only, not --encoding raw")
    if message_format == "bare" and batch != 1:
        problems.append("--format bare sends one image per message: --batch must be 1")
    if fps < 0 or not np.isfinite(fps):
        problems.append(f"--fps must be >= 0 (0 = as fast as possible), got {fps}")
    if streams < 1:
        problems.append(f"--streams must be >= 1, got {streams}")
    if count < 1:
        problems.append(f"--count must be >= 1, got {count}")
    if batch < 1:
        problems.append(f"--batch must be >= 1, got {batch}")
    if not 1 <= jpeg_quality <= 95:
        problems.append(f"JPEG quality must be in 1..95, got {jpeg_quality}")
    if problems:
        raise ProducerOptionError("; ".join(problems))


def ensure_frames_topic(
    settings: KafkaSettings, bootstrap: str | None, topic: str, topic_settings: TopicSettings
) -> bool:
    """Create the frames topic with the spec's defaults when it is missing; True if created."""
    spec = default_topic_specs(topic_settings)[0].model_copy(update={"name": topic})
    with admin_client(settings, bootstrap) as admin:
        if topic in admin.topic_names(internal=True):
            return False
        apply_topic_specs(admin, [spec])
    return True


def camera_linger_ms(fps: float) -> int:
    """The frame producers' default ``linger.ms``: 0 for cameras at a frame rate, 5 flat out.

    A live camera sends each frame as it is taken: at 15-30 fps it has no other frame of its
    own to batch with, so a linger only delays every frame (one producer for 8 simulated
    cameras of 640x480 at 15 fps: broker leg p50 7.1 ms with 5, 2.0 ms with 0;
    docs/BENCHMARKS.md). A replay flat out (``fps`` 0) batches its messages.
    """
    return 0 if fps > 0 else 5


def frames_producer(
    settings: KafkaSettings,
    bootstrap: str | None,
    *,
    linger_ms: int = 5,
    max_request_size: int = 8 * 1024 * 1024,
) -> Producer:
    """An idempotent producer (acks=all) for frames, or KafkaConnectionError."""
    config = settings.rdkafka_config(bootstrap)
    try:
        producer = Producer(
            {
                **config,
                **rdkafka_callbacks(log),
                "enable.idempotence": True,  # acks=all, no duplicates or reordering on retry
                "linger.ms": linger_ms,
                "batch.size": 256 * 1024,
                "message.max.bytes": max_request_size,
                # Same partition per key as kafka-python and the Java client (murmur2).
                "partitioner": "murmur2_random",
            }
        )
        # librdkafka connects lazily: fail now, plainly, rather than at the first send.
        producer.list_topics(timeout=settings.request_timeout_ms / 1000)
    except KafkaException as error:
        raise KafkaConnectionError(
            f"cannot produce to Kafka at {config['bootstrap.servers']}: {rdkafka_reason(error)}"
        ) from None
    return producer


# What a record adds to its key, value and headers in a record batch, at most (varints,
# attributes, the batch header shared by the batch): a message is refused before it is sent
# when its bytes plus this exceed the limit, not by the broker after.
RECORD_OVERHEAD_BYTES = 128
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1048588  # a topic's max.message.bytes when not set on it


def topic_message_limit(
    settings: KafkaSettings, bootstrap: str | None, topic: str, producer_limit: int
) -> tuple[int, str]:
    """The largest message ``topic`` takes from this producer, and the setting that says so.

    The smaller of the topic's ``max.message.bytes`` (as set on the topic; Kafka's default
    1048588 when not) and the producer's ``message.max.bytes`` (topics.max_message_bytes). A
    cluster that will not describe the topic's configs (ACLs) leaves the producer's limit.
    """
    producer_name = f"the producer's message.max.bytes ({producer_limit:,} bytes)"
    try:
        with admin_client(settings, bootstrap) as admin:
            configs = admin.topic_configs([topic]).get(topic, {})
    except StreamsError as error:
        log.info("cannot read max.message.bytes of topic %s (%s)", topic, error)
        return producer_limit, producer_name
    topic_limit = int(configs.get("max.message.bytes", KAFKA_DEFAULT_MAX_MESSAGE_BYTES))
    if topic_limit < producer_limit:
        return topic_limit, f"max.message.bytes of topic {topic!r} ({topic_limit:,} bytes)"
    return producer_limit, producer_name


class _Sender:
    """Sends frame messages and counts what the broker confirmed or refused."""

    def __init__(
        self,
        producer: Producer,
        topic: str,
        message_format: MessageFormat,
        limit: tuple[int, str] | None = None,
    ):
        self.producer = producer
        self.topic = topic
        self.message_format = message_format
        self.limit = limit
        self.messages = 0
        self.bytes = 0
        self.failures: list[str] = []

    def _delivered(self, error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            self.failures.append(f"{error.name()}: {error.str()}")

    def send(self, frames: list[FrameRecord]) -> None:
        """Send one message holding frames (all of one camera)."""
        headers: list[tuple[str, str | bytes | None]]
        if self.message_format == "bare":
            (frame,) = frames
            value, headers = frame.data, list(bare_headers(frame))
        else:
            value = encode_frames(frames)
            headers = [("content-type", ARROW_CONTENT_TYPE.encode())]
        self._check_size(frames, value, headers)
        while True:
            try:
                self.producer.produce(
                    self.topic,
                    value=value,
                    key=frames[0].stream_id.encode(),
                    headers=headers,
                    on_delivery=self._delivered,
                )
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                self.producer.poll(0.05)
            except KafkaException as error:
                raise ProducerError(
                    f"sending to {self.topic} failed: {rdkafka_reason(error)}"
                ) from None
        self.producer.poll(0)  # delivery reports (failures) of earlier messages
        self.messages += 1
        self.bytes += len(value)

    def _check_size(
        self, frames: list[FrameRecord], value: bytes, headers: list[tuple[str, Any]]
    ) -> None:
        if self.limit is None:
            return
        limit, which = self.limit
        size = (
            len(value)
            + len(frames[0].stream_id)
            + sum(len(key) + len(header or b"") for key, header in headers)
        )
        if size + RECORD_OVERHEAD_BYTES <= limit:
            return
        first = frames[0]
        what = f"frame {first.frame_index} of {first.stream_id}" + (
            f" (and {len(frames) - 1} more in its message)" if len(frames) > 1 else ""
        )
        raise ProducerError(
            f"{what} is too large for {self.topic}: a {first.width}x{first.height} "
            f"{first.encoding} frame makes a {size:,}-byte message, over {which}; lower "
            "--max-side or --jpeg-quality (or --batch), or raise the limit "
            "(topics.max_message_bytes and the topic's max.message.bytes)"
        )

    def flush(self, timeout_s: float) -> None:
        left = self.producer.flush(timeout_s)
        if left:
            raise ProducerError(
                f"{left} of {self.messages} messages to {self.topic} were not delivered "
                f"within {timeout_s:g} s"
            )


def _primed(shots: Iterator[SourceFrame], name: str) -> Iterator[SourceFrame]:
    """The same shots, the first one already read."""
    try:
        first = next(shots)
    except StopIteration:
        raise SourceError(f"source {name} has no frames") from None
    return itertools.chain([first], shots)


def _pace(due: float) -> None:
    delay = due - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def produce_frames(
    settings: KafkaSettings,
    bootstrap: str | None,
    source: str | FrameSource,
    topic: str,
    fps: float,
    streams: int,
    count: int,
    encoding: str = "jpeg",
    *,
    message_format: MessageFormat = "arrow",
    batch: int = 1,
    seed: int = 0,
    frame_size: int | tuple[int, int] | None = None,
    hold_frames: int = DEFAULT_HOLD_FRAMES,
    max_side: int = DEFAULT_MAX_SIDE,
    jpeg_quality: int = 90,
    data_dir: Path | None = None,
    reconnect_timeout_s: float = 60.0,
    stream_prefix: str = "cam",
    topic_settings: TopicSettings | None = None,
    create_topic: bool = True,
    progress: ProgressCallback | None = None,
    flush_timeout_s: float = 60.0,
    linger_ms: int | None = None,
) -> dict[str, Any]:
    """Produce ``count`` frames from each of ``streams`` cameras to ``topic``; return a summary.

    ``source`` is ``synthetic``, ``fashion-mnist``, an rtsp:// URL, a video file path, or a
    FrameSource. A message larger than the topic takes (its max.message.bytes or the
    producer's message.max.bytes) is refused with a ProducerError naming the limit. Sources
    that reconnect (rtsp://) report ``reconnects`` and ``dropped`` in the summary.
    ``progress`` is called with the number of frames each sent message holds. The summary has
    ``frames``, ``messages``, ``bytes``, ``seconds``, ``fps`` (achieved, all cameras),
    ``stream_ids``, ``topic_created`` and ``notes``. ``linger_ms`` None:
    :func:`camera_linger_ms`. Raises ProducerError, SourceError or
    KafkaConnectionError (all StreamsError).
    """
    check_options(
        fps=fps,
        streams=streams,
        count=count,
        encoding=encoding,
        message_format=message_format,
        batch=batch,
        jpeg_quality=jpeg_quality,
    )
    if isinstance(source, str) and is_scenes_source(source):
        # scenes cameras render and encode their clip once, in the encoding asked for
        source = ScenesSource(
            source, frame_size=_frame_size_wh(frame_size), seed=seed, hold_frames=hold_frames,
            encoding=encoding, jpeg_quality=jpeg_quality, data_dir=data_dir,
            clip_frames=min(count, DEFAULT_CLIP_FRAMES),
        )
    frame_source = (
        open_source(
            source,
            fps=fps,
            seed=seed,
            frame_size=_square_side(frame_size),
            hold_frames=hold_frames,
            max_side=max_side,
            data_dir=data_dir,
            reconnect_timeout_s=reconnect_timeout_s,
        )
        if isinstance(source, str)
        else source
    )
    topic_settings = topic_settings or TopicSettings()
    created = (
        ensure_frames_topic(settings, bootstrap, topic, topic_settings) if create_topic else False
    )
    stream_ids = [f"{stream_prefix}-{k}" for k in range(streams)]
    # Each camera's first shot is taken before the clock starts: a source that opens lazily
    # (a dataset loaded, a video file opened on first read) would otherwise put the schedule
    # behind, and the cameras would catch up in a burst no real camera sends.
    try:
        iterators = [_primed(frame_source.stream(k), frame_source.name) for k in range(streams)]
    except BaseException:
        _close_source(frame_source)
        raise
    pending: list[list[FrameRecord]] = [[] for _ in range(streams)]
    try:  # the sources' threads (rtsp://) run from here: closed on any failure to start
        limit = topic_message_limit(settings, bootstrap, topic, topic_settings.max_message_bytes)
        producer = frames_producer(
            settings,
            bootstrap,
            linger_ms=camera_linger_ms(fps) if linger_ms is None else linger_ms,
            max_request_size=limit[0],
        )
    except BaseException:
        _close_source(frame_source)
        raise
    sender = _Sender(producer, topic, message_format, limit)
    warm_up()
    frames = 0
    start = time.perf_counter()
    cpu_start = time.process_time()
    try:
        for index in range(count):
            for k, stream_id in enumerate(stream_ids):
                if fps > 0:
                    _pace(start + (index + k / streams) / fps)
                try:
                    shot = next(iterators[k])
                except StopIteration:
                    raise SourceError(f"source {frame_source.name} ran out of frames") from None
                captured_at_ns = time.time_ns()
                pixels = shot.pixels
                pending[k].append(
                    FrameRecord(
                        stream_id=stream_id,
                        frame_index=index,
                        captured_at_ns=captured_at_ns,
                        encoding=encoding,
                        height=int(pixels.shape[0]),
                        width=int(pixels.shape[1]),
                        channels=1 if pixels.ndim == 2 else int(pixels.shape[2]),
                        data=_shot_bytes(shot, encoding, jpeg_quality),
                        label=shot.label,
                    )
                )
                frames += 1
                if len(pending[k]) >= batch or index == count - 1:
                    sender.send(pending[k])
                    if progress is not None:
                        progress(len(pending[k]))
                    pending[k] = []
        sender.flush(flush_timeout_s)
    except KafkaException as error:
        raise ProducerError(f"producing to {topic} failed: {rdkafka_reason(error)}") from None
    finally:
        seconds = time.perf_counter() - start
        cpu_s = time.process_time() - cpu_start
        producer.flush(5)  # what an interrupted run already sent gets 5 s to be delivered,
        producer.purge()  # then the rest is dropped rather than waited for
        producer.close()
        _close_source(frame_source)
    if sender.failures:
        raise ProducerError(
            f"{len(sender.failures)} of {sender.messages} messages to {topic} were not "
            f"delivered; first: {sender.failures[0]}"
        )
    return {
        "source": frame_source.name,
        "topic": topic,
        "topic_created": created,
        "streams": streams,
        "stream_ids": stream_ids,
        "encoding": encoding,
        "format": message_format,
        "batch": batch,
        "frames": frames,
        "messages": sender.messages,
        "bytes": sender.bytes,
        "seconds": round(seconds, 3),
        "fps": round(frames / seconds, 1) if seconds > 0 else 0.0,
        "target_fps": fps * streams,
        **_source_counts(frame_source),
        # This process's CPU while sending (encoding included unless the source pre-encoded);
        # a pre-encoding source's render and encode time before the clock started, apart.
        "cpu_s": round(cpu_s, 3),
        **({"prerender_s": round(frame_source.prerender_s, 3)}
           if isinstance(frame_source, ScenesSource) else {}),
        "notes": list(frame_source.notes),
    }


def _close_source(source: FrameSource) -> None:
    """Stop a source's own threads (an rtsp:// camera's readers), if it has any."""
    close = getattr(source, "close", None)
    if close is not None:
        close()


def _source_counts(source: FrameSource) -> dict[str, int]:
    """``reconnects`` and ``dropped`` of a live source (rtsp://); nothing for the others."""
    return {
        key: int(getattr(source, key)) for key in ("reconnects", "dropped") if hasattr(source, key)
    }


def _frame_size_wh(frame_size: int | tuple[int, int] | None) -> tuple[int, int]:
    """--frame-size as (width, height) for the scenes cameras (one number: a square)."""
    if frame_size is None:
        return DEFAULT_SCENES_FRAME_SIZE
    return (frame_size, frame_size) if isinstance(frame_size, int) else frame_size


def _square_side(frame_size: int | tuple[int, int] | None) -> int:
    """--frame-size as the synthetic camera's side: its frames are square."""
    if frame_size is None:
        return DEFAULT_FRAME_SIZE
    if isinstance(frame_size, int):
        return frame_size
    width, height = frame_size
    if width != height:
        raise ProducerOptionError(
            f"--frame-size {width}x{height}: the synthetic camera's frames are square "
            "(give one number); WxH is for --source scenes")
    return width


def _shot_bytes(shot: SourceFrame, encoding: str, jpeg_quality: int) -> bytes:
    """A pre-encoded shot's bytes (the scenes cameras' clips), else its pixels encoded now."""
    if isinstance(shot, EncodedFrame):
        if shot.encoding != encoding:
            raise SourceError(f"the source encoded its frames as {shot.encoding}, "
                              f"not {encoding}")
        return shot.data
    return encode_pixels(shot.pixels, encoding, jpeg_quality)


def summary_line(summary: dict[str, Any]) -> str:
    """One line for people: frames, messages, bytes, seconds and achieved frame rate."""
    return (
        f"produced {summary['frames']} frames from {summary['streams']} stream(s) of "
        f"{summary['source']} to {summary['topic']}: {summary['messages']} messages, "
        f"{summary['bytes']:,} bytes in {summary['seconds']:.2f} s = {summary['fps']:,.1f} "
        f"frames/s ({summary['format']}, {summary['encoding']})"
        + (
            f"; {summary['reconnects']} reconnect(s), {summary['dropped']} frame(s) dropped"
            if "reconnects" in summary
            else ""
        )
        + (
            f"; the cameras' clips were rendered and encoded beforehand in "
            f"{summary['prerender_s']:.1f} s"
            if "prerender_s" in summary
            else ""
        )
    )


@contextlib.contextmanager
def progress_bar(
    console: Console, total: int, description: str = "producing"
) -> Iterator[ProgressCallback]:
    """A rich progress bar over ``total`` frames; yields the callback for produce_frames."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("frames"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total)

        def advance(frames: int) -> None:
            bar.advance(task, frames)

        yield advance

"""What the peer pipelines share: reading framecast's frames, the model, the label JSON.

Only numpy, Pillow, pyarrow and the standard library (plus ai_edge_litert for the model), so
that each peer's own virtual environment needs nothing of framecast's. The arithmetic is
framecast's, step for step (serving/preprocess.py image_pixels, serving/runtimes.py,
serving/app.py): a frame is decoded by Pillow to uint8 (a JPEG at the DCT scale the model
needs, grayscale models straight from its luma; otherwise in full, RGB converted to gray with
the same weights), resized bilinearly by Pillow when it is not the model's size, scaled by
1/255 in float32 and quantized with the interpreter's input scale and zero point; the class is the
highest dequantized probability (ties to the lower class id). The last two steps are one
256-entry lookup table here: they act on each uint8 pixel alone, so the table gives the same
int8 values as computing them per pixel.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

ARROW_CONTENT_TYPE = "application/vnd.apache.arrow.stream"
BARE_TYPES = {"image/jpeg": "jpeg", "image/jpg": "jpeg", "image/png": "png"}
_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG"}
MAX_PIXELS = 3840 * 2160  # a replica's default limit (serving.preprocess.DecodeLimits)


@dataclass(slots=True)
class Frame:
    """One frame of a consumed message, with where it came from."""

    stream_id: str
    frame_index: int
    captured_at_ns: int
    encoding: str
    height: int
    width: int
    channels: int
    data: bytes
    label: int | None
    topic: str
    partition: int
    offset: int
    row: int
    consumed_ns: int
    timestamp_ns: int | None  # Kafka's timestamp, None when it has none


class BadFrame(ValueError):
    """A message or frame that is not one of framecast's frames (the peers skip it)."""


def _header(named: dict[str, bytes], name: str) -> int:
    raw = named.get(name)
    if raw is None:
        raise BadFrame(f"bare image needs header {name}")
    try:
        return int(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise BadFrame(f"header {name} is not an integer") from None


def parse_message(
    value: bytes | None,
    headers: list[tuple[str, bytes | None]] | None,
    key: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int | None,
    consumed_ns: int,
) -> list[Frame]:
    """The frames of one frames-topic message (Arrow IPC rows, or one bare JPEG/PNG)."""
    if not value:
        raise BadFrame("empty message")
    named = {k.lower(): v or b"" for k, v in headers or []}
    content_type = named.get("content-type", b"").decode("latin-1").split(";")[0].strip()
    timestamp_ns = timestamp_ms * 1_000_000 if timestamp_ms and timestamp_ms > 0 else None
    if content_type.lower() == ARROW_CONTENT_TYPE:
        try:
            table = pa.ipc.open_stream(value).read_all()
            columns = [table.column(name).to_pylist() for name in _ARROW_COLUMNS]
        except (pa.ArrowInvalid, KeyError, OSError) as error:
            raise BadFrame(f"not an Arrow stream of frames: {error}") from None
        return [
            Frame(*row, topic, partition, offset, r, consumed_ns, timestamp_ns)
            for r, row in enumerate(zip(*columns, strict=True))
        ]
    encoding = BARE_TYPES.get(content_type.lower())
    if encoding is None:
        raise BadFrame(f"content-type {content_type!r} is not a frame")
    stream_id = named.get("stream_id", key or b"").decode("utf-8", errors="replace")
    label = _header(named, "label") if named.get("label") else None
    return [
        Frame(stream_id, _header(named, "frame_index"), _header(named, "captured_at_ns"),
              encoding, 0, 0, 0, value, label, topic, partition, offset, 0, consumed_ns,
              timestamp_ns)
    ]


_ARROW_COLUMNS = ("stream_id", "frame_index", "captured_at_ns", "encoding", "height", "width",
                  "channels", "data", "label")


def _open(data: bytes, encoding: str,
          draft: tuple[str, tuple[int, int]] | None = None) -> tuple[Image.Image, Any]:
    """Decode a JPEG/PNG to a Pillow image of mode L or RGB, with the box of a JPEG draft."""
    pil_format = _PIL_FORMATS.get(encoding)
    if pil_format is None:
        raise BadFrame(f"encoding {encoding!r} is not jpeg, png or raw")
    box = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[pil_format])
            if image.width * image.height > MAX_PIXELS:
                raise BadFrame(f"{image.width}x{image.height} is over the pixel limit")
            if draft is not None:
                drafted = image.draft(*draft)
                if drafted is not None:
                    box = drafted[1]
            image.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        raise BadFrame(f"not a valid {encoding} image ({error})") from None
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return image, box


def _array(image: Image.Image) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def decode(data: bytes, encoding: str, height: int = 0, width: int = 0,
           channels: int = 0) -> np.ndarray:
    """A frame's pixels as uint8 [H, W, C], as a replica decodes them in full."""
    if encoding == "raw":
        if len(data) != height * width * channels or channels not in (1, 3, 4):
            raise BadFrame(f"raw frame of {len(data)} bytes is not {height}x{width}x{channels}")
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, channels)
    return _array(_open(data, encoding)[0])


def fit(image: np.ndarray, height: int, width: int, channels: int) -> np.ndarray:
    """uint8 pixels in the model's shape: serving.preprocess.to_model_pixels."""
    if image.shape[2] != channels:
        if channels == 1:
            gray = image[:, :, :3].astype(np.float32) @ np.array(
                [0.299, 0.587, 0.114], dtype=np.float32
            )
            image = gray[:, :, None].round().astype(np.uint8)
        else:
            image = np.repeat(image[:, :, :1], channels, axis=2)
    if image.shape[0] != height or image.shape[1] != width:
        mode = "L" if channels == 1 else "RGB"
        pil = Image.fromarray(image[:, :, 0] if channels == 1 else image, mode=mode)
        resized = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR))
        image = resized[:, :, None] if resized.ndim == 2 else resized
    return image


def model_pixels(frame: Frame, hwc: tuple[int, int, int]) -> np.ndarray:
    """A frame as the model's uint8 [H, W, C]: serving.preprocess.image_pixels. A JPEG is
    decoded at the DCT scale the model needs (Pillow's draft) and resized from there; PNG and
    raw frames are decoded in full, then converted and resized."""
    out_h, out_w, out_c = hwc
    if frame.encoding != "jpeg" or out_c not in (1, 3):
        image = decode(frame.data, frame.encoding, frame.height, frame.width, frame.channels)
        return fit(image, out_h, out_w, out_c)
    mode = "L" if out_c == 1 else "RGB"
    # framecast's DRAFT_COVER: a side may decode down to 0.8 of the model's, then resized up.
    wanted = (math.ceil(out_w * 0.8), math.ceil(out_h * 0.8))
    pil, box = _open(frame.data, "jpeg", draft=(mode, wanted))
    if pil.mode != mode and out_c == 1:  # a CMYK JPEG, converted to RGB
        return fit(_array(pil), out_h, out_w, out_c)
    if pil.size != (out_w, out_h) or (box is not None and box != (0, 0, out_w, out_h)):
        pil = pil.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box)
    pixels = _array(pil)
    if pixels.shape[2] != out_c:  # a grayscale JPEG for an RGB model
        pixels = np.repeat(pixels, out_c, axis=2)
    return pixels


def _bucket(n: int) -> int:
    size = 1
    while size < n:
        size *= 2
    return size


class Model:
    """The int8 LiteRT model in process, with its manifest's name, version and classes."""

    def __init__(self, path: Path, threads: int = 1, max_batch: int = 256) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter_cls = Interpreter
        self._content = path.read_bytes()
        manifest = json.loads((path.parent / "manifest.json").read_text())
        sha256 = hashlib.sha256(self._content).hexdigest()
        listed = manifest.get("files", {}).get(path.name, {}).get("sha256")
        if listed is not None and listed != sha256:
            raise SystemExit(f"{path}: sha256 {sha256[:12]}... is not the manifest's")
        self.classes: list[str] = list(manifest["classes"])
        self.info = {"name": manifest["name"], "version": manifest["version"], "sha256": sha256}
        self.threads = max(1, threads)
        self.max_batch = max_batch
        self._interpreters: dict[int, Any] = {}
        probe = self._interpreter(1)
        inp, out = probe.get_input_details()[0], probe.get_output_details()[0]
        self.hwc = (int(inp["shape"][1]), int(inp["shape"][2]), int(inp["shape"][3]))
        self._in_dtype = np.dtype(inp["dtype"])
        self._out_q = out["quantization"]
        self._out_float = np.dtype(out["dtype"]) == np.float32
        pixels = np.arange(256, dtype=np.uint8).astype(np.float32) / 255.0
        if self._in_dtype == np.float32:
            self._lut = pixels
        else:  # serving.runtimes.LiteRTRuntime._quantize, once per pixel value
            scale, zero_point = inp["quantization"]
            info = np.iinfo(self._in_dtype)
            q = np.clip(np.round(pixels / scale + zero_point), info.min, info.max)
            self._lut = q.astype(self._in_dtype)

    def _interpreter(self, batch: int) -> Any:
        interp = self._interpreters.get(batch)
        if interp is None:
            interp = self._interpreter_cls(model_content=self._content, num_threads=self.threads)
            detail = interp.get_input_details()[0]
            if int(detail["shape"][0]) != batch:
                interp.resize_tensor_input(detail["index"], [batch, *detail["shape"][1:]])
            interp.allocate_tensors()
            self._interpreters[batch] = interp
        return interp

    def prepare(self, frame: Frame) -> np.ndarray:
        """One frame as uint8 pixels of the model's shape (BadFrame if it is not a frame)."""
        return model_pixels(frame, self.hwc)

    def classify(self, pixels: list[np.ndarray]) -> tuple[list[int], list[float]]:
        """Class ids and scores of a batch of uint8 model-shaped frames."""
        ids: list[int] = []
        scores: list[float] = []
        for start in range(0, len(pixels), self.max_batch):
            chunk = pixels[start : start + self.max_batch]
            size = _bucket(len(chunk))
            batch = np.zeros((size, *self.hwc), dtype=np.uint8)
            batch[: len(chunk)] = chunk
            interp = self._interpreter(size)
            interp.set_tensor(interp.get_input_details()[0]["index"], self._lut[batch])
            interp.invoke()
            raw = interp.get_tensor(interp.get_output_details()[0]["index"])[: len(chunk)]
            if self._out_float:
                probs = raw.astype(np.float32)
            else:
                scale, zero_point = self._out_q
                probs = ((raw.astype(np.float32) - zero_point) * scale).astype(np.float32)
            best = np.argmax(probs, axis=1)  # the first highest: ties to the lower class id
            ids += best.tolist()
            scores += probs[np.arange(len(chunk)), best].tolist()
        return ids, scores

    def label_frames(self, frames: list[Frame]) -> tuple[list[tuple[Frame, dict[str, Any]]], int]:
        """Decode, classify and label a batch of frames: ((frame, label record) for each good
        frame, how many were not frames) - what every Kafka peer does per batch."""
        started_ns = now_ns()
        began = time.perf_counter()
        good, pixels, bad = [], [], 0
        for frame in frames:
            try:
                pixels.append(self.prepare(frame))
                good.append(frame)
            except BadFrame:
                bad += 1
        decoded = time.perf_counter()
        ids, scores = self.classify(pixels) if pixels else ([], [])
        inference_ms = (time.perf_counter() - decoded) * 1e3
        decode_ms = (decoded - began) * 1e3
        labeled_ns = now_ns()
        return [
            (frame, label(frame, self, class_id, score, labeled_ns,
                          timings(frame, started_ns, labeled_ns, decode_ms, inference_ms)))
            for frame, class_id, score in zip(good, ids, scores, strict=True)
        ], bad


def label(frame: Frame, model: Model, class_id: int, score: float, labeled_at_ns: int,
          timings_ms: dict[str, float]) -> dict[str, Any]:
    """The label record of one frame (DESIGN's label contract, framecast's field order)."""
    return {
        "stream_id": frame.stream_id,
        "frame_index": frame.frame_index,
        "source": {"topic": frame.topic, "partition": frame.partition, "offset": frame.offset,
                   "row": frame.row},
        "status": "ok",
        "class_id": class_id,
        "label": model.classes[class_id],
        "score": score,
        "model": model.info,
        "captured_at_ns": frame.captured_at_ns,
        "labeled_at_ns": labeled_at_ns,
        "timings_ms": timings_ms,
        "ground_truth": frame.label,
    }


def timings(frame: Frame, started_ns: int, labeled_at_ns: int, decode_ms: float,
            inference_ms: float) -> dict[str, float]:
    """timings_ms of a label: broker, queue, decode, inference, end_to_end (as framecast)."""
    broker = (frame.consumed_ns - frame.timestamp_ns) / 1e6 if frame.timestamp_ns else 0.0
    return {
        "broker": round(max(0.0, broker), 3),
        "queue": round(max(0, started_ns - frame.consumed_ns) / 1e6, 3),
        "decode": round(decode_ms, 3),
        "inference": round(inference_ms, 3),
        "end_to_end": round(max(0, labeled_at_ns - frame.captured_at_ns) / 1e6, 3),
    }


def encode(record: dict[str, Any]) -> bytes:
    """Compact JSON for the wire."""
    return json.dumps(record, separators=(",", ":")).encode()


def kafka_arguments(description: str) -> argparse.Namespace:
    """The command line every Kafka peer takes (peers/README.md)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--bootstrap", required=True, help="HOST:PORT of a Kafka broker")
    parser.add_argument("--frames", required=True, help="the frames topic")
    parser.add_argument("--labels", required=True, help="the labels topic")
    parser.add_argument("--group", required=True, help="the consumer group")
    parser.add_argument("--model", required=True, type=Path, help="PATH/model.tflite")
    parser.add_argument("--max-frames", required=True, type=int, help="exit after N labels")
    parser.add_argument("--batch", type=int, default=64, help="largest model batch")
    parser.add_argument("--threads", type=int, default=1, help="LiteRT threads")
    args = parser.parse_args()
    if args.max_frames < 1 or args.batch < 1 or args.threads < 1:
        parser.error("--max-frames, --batch and --threads must be >= 1")
    if not args.model.is_file() or not (args.model.parent / "manifest.json").is_file():
        parser.error(f"--model {args.model}: no such file, or no manifest.json beside it")
    return args


def cpu_seconds() -> float:
    """CPU time of this process, all threads, user + system."""
    times = os.times()
    return times.user + times.system


def ready() -> None:
    """Tell the harness that partitions are assigned (stderr, one line)."""
    print("READY", file=sys.stderr, flush=True)


def finish(labelled: int, **extra: Any) -> None:
    """The one JSON line on stdout that the harness reads."""
    line = {"labelled": labelled, "cpu_s": round(cpu_seconds(), 3), **extra}
    print(json.dumps(line), flush=True)


def now_ns() -> int:
    """Wall-clock time in ns (labels compare it with the camera's captured_at_ns)."""
    return time.time_ns()

"""Parquet sink: labels and latency aggregates for offline analysis (pyarrow)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


class ParquetSink:
    """Buffers rows and writes them as numbered Parquet files per consumer."""

    def __init__(self, directory: Path, consumer: str, rows_per_file: int = 50_000) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.consumer = consumer
        self.rows_per_file = rows_per_file
        self.labels: list[dict[str, Any]] = []
        self.latency: list[dict[str, Any]] = []
        self.files: list[Path] = []

    def add_label(self, record: dict[str, Any]) -> None:
        """Buffer one label (flattened: source.* and timings_ms.* become columns)."""
        row = {k: v for k, v in record.items() if k not in ("source", "timings_ms", "model")}
        row.update({f"source_{k}": v for k, v in record["source"].items()})
        row.update({f"{k}_ms": v for k, v in record["timings_ms"].items()})
        model = record.get("model") or {}
        row["model_name"], row["model_version"] = model.get("name"), model.get("version")
        self.labels.append(row)
        if len(self.labels) >= self.rows_per_file:
            self._flush("labels", self.labels)

    def add_latency(self, record: dict[str, Any]) -> None:
        """Buffer one latency aggregate."""
        self.latency.append(dict(record))

    def _flush(self, kind: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        path = self.directory / f"{kind}-{self.consumer}-{time.time_ns()}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        self.files.append(path)
        rows.clear()

    def close(self) -> None:
        """Write what is buffered."""
        self._flush("labels", self.labels)
        self._flush("latency", self.latency)

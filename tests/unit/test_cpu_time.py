"""python -m jobs.cpu_time: the shipped int8 models' CPU time per image, side by side."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cpu_time import cpu_time_per_image

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_the_stream_model_costs_a_fraction_of_the_optimized_one() -> None:
    optimized, stream = MODELS / "fashion_mnist_optimized", MODELS / "fashion_mnist_stream"
    rows = cpu_time_per_image([optimized, stream], batch=8, rounds=3, calls=20)
    assert [row["artifact"] for row in rows] == [str(optimized), str(stream)]
    assert rows[0]["vs_first"] == pytest.approx(1.0)
    for row in rows:
        assert 0 < row["us_per_image_min"] <= row["us_per_image_median"]
    # 1.90 M against 17.88 M MACs: whatever the machine's load, well under half the time.
    assert rows[1]["vs_first"] < 0.5, rows


def test_the_command_prints_json() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cpu_time", str(MODELS / "fashion_mnist_stream"),
         "--rounds", "2", "--calls", "5", "--json"],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert row["batch"] == 1 and row["us_per_image_median"] > 0

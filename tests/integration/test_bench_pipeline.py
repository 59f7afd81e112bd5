"""The pipeline bench's measured run (`cluster.bench.pipeline._pipeline_run`) on the session
broker and Serve app: real `framecast produce` cameras in their own process, the stream
classifier in this one. Its figures are not checked (the machine is noisy); that every frame
is labelled and measured, is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cluster.bench.pipeline import _pipeline_run
from cluster.settings import load_settings
from streams.config import KafkaSettings

pytestmark = pytest.mark.slow


def session_app_settings(kafka_settings: KafkaSettings, stream_app: str, tmp_path: Path) -> Any:
    """Settings that reach the session broker and its Serve app (the shipped gray model)."""
    return load_settings(
        home=tmp_path / "home",
        kafka={"bootstrap_servers": kafka_settings.bootstrap_servers},
        serve={"app_name": stream_app, "route_prefix": "/stream"},
    )


def test_a_paced_run_labels_every_frame_and_measures_its_latency(
    kafka_settings: KafkaSettings, stream_app: str, tmp_path: Path
) -> None:
    settings = session_app_settings(kafka_settings, stream_app, tmp_path)
    run = _pipeline_run(
        settings,
        str(kafka_settings.bootstrap_servers),
        cameras=4,
        fps=30.0,
        per_camera=45,
        batch=1,
        classifier="framecast",
    )
    assert run["frames"] == run["labels"] == 180
    assert run["classifier_totals"]["labelled"] == 180
    assert run["produce_fps"] > 0 and run["sustained_fps"] > 0
    assert 0 < run["p50_ms"] <= run["p99_ms"] <= run["max_ms"]
    assert all(v is not None for v in run["p50_parts_ms"].values())


def test_the_naive_baseline_labels_every_frame_with_the_artifact_it_is_given(
    kafka_settings: KafkaSettings, served_artifact: Path, tmp_path: Path
) -> None:
    settings = load_settings(
        home=tmp_path / "home", kafka={"bootstrap_servers": kafka_settings.bootstrap_servers}
    )

    def naive(artifact: Path | None) -> dict[str, Any]:
        return _pipeline_run(
            settings,
            str(kafka_settings.bootstrap_servers),
            cameras=2,
            fps=0.0,
            per_camera=20,
            batch=1,
            classifier="naive",
            artifact=artifact,
        )

    with pytest.raises(ValueError, match="artifact"):
        naive(None)
    run = naive(served_artifact)
    assert run["frames"] == run["labels"] == 40
    assert run["classifier_totals"] == {"labelled": 40}
    assert run["sustained_fps"] > 0 and 0 < run["p50_ms"] <= run["p99_ms"]

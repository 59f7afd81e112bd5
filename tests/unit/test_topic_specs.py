"""Topic spec files: validation errors name what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.config import TopicSettings
from streams.exceptions import TopicSpecError
from streams.topics import default_topic_specs, load_topic_specs


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "topics.yaml"
    path.write_text(text)
    return path


def test_valid_spec_is_loaded_with_string_configs(tmp_path: Path) -> None:
    specs = load_topic_specs(
        _write(
            tmp_path,
            """
topics:
  - name: cams.frames
    partitions: 8
    config: {retention.ms: 3600000, max.message.bytes: 1048576}
""",
        )
    )
    assert specs[0].name == "cams.frames"
    assert specs[0].partitions == 8
    assert specs[0].config == {"retention.ms": "3600000", "max.message.bytes": "1048576"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "topics:\n  - name: a\n    partitions: 0\n",
            r"topics\.0\.partitions: Input should be greater than 0",
        ),
        ("topics:\n  - name: 'bad name'\n", r"topics\.0\.name: String should match pattern"),
        (
            "topics:\n  - name: a\n    partitons: 3\n",
            r"topics\.0\.partitons: Extra inputs are not permitted",
        ),
        ("topics:\n  - name: a\n  - name: a\n", r"duplicate topics \['a'\]"),
        ("topics: [\n", "cannot read topic spec"),
        ("topics: []\n", r"topics: List should have at least 1 item"),
    ],
)
def test_invalid_spec_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TopicSpecError, match=message):
        load_topic_specs(_write(tmp_path, text))


def test_default_specs_follow_topic_settings() -> None:
    specs = {
        s.name: s
        for s in default_topic_specs(
            TopicSettings(frames="f", partitions=3, max_message_bytes=1234)
        )
    }
    assert set(specs) == {"f", "labels", "latency", "frames.dlq"}
    assert specs["f"].partitions == 3
    assert specs["f"].config["max.message.bytes"] == "1234"
    assert specs["latency"].partitions == 1

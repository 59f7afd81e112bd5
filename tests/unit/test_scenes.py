"""Camera scenes (serving/scenes.py), the scenes datasets and the scenes camera."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.data import load_dataset
from jobs.exceptions import DatasetError, OptionError
from serving import scenes as scenes_module
from serving.fashion_mnist import FASHION_MNIST_CLASSES
from serving.scenes import garment_set, render_scenes
from streams.exceptions import ProducerOptionError, SourceError
from streams.scene_source import EncodedFrame, ScenesSource, ScenesVideo, parse_frame_size


@pytest.mark.parametrize("size", [(224, 224), (64, 48), (40, 96)])
@pytest.mark.parametrize("style", ["train", "heldout"])
def test_scenes_have_the_asked_shape_dtype_and_labels(size: tuple[int, int], style: str) -> None:
    images, labels = render_scenes(12, size=size, seed=3, style=style)
    width, height = size
    assert images.shape == (12, height, width, 3)
    assert images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() <= 9
    assert sorted(labels[:10].tolist()) == list(range(10))  # every class once per ten
    assert images.std() > 10  # not a blank frame


def test_scenes_are_deterministic_per_seed_and_prefix_stable() -> None:
    first, first_labels = render_scenes(6, size=(64, 64), seed=7)
    again, again_labels = render_scenes(6, size=(64, 64), seed=7)
    longer, longer_labels = render_scenes(9, size=(64, 64), seed=7)
    other, _ = render_scenes(6, size=(64, 64), seed=8)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first_labels, again_labels)
    np.testing.assert_array_equal(first, longer[:6])
    np.testing.assert_array_equal(first_labels, longer_labels[:6])
    assert not np.array_equal(first, other)


def _border_and_hue_stats(images: np.ndarray) -> tuple[float, float]:
    """Mean saturation of the frames (backgrounds dominate) and share of blue-ish pixels."""
    rgb = images.reshape(-1, 3).astype(np.float32)
    saturation = (rgb.max(axis=1) - rgb.min(axis=1)) / np.maximum(rgb.max(axis=1), 1.0)
    blue = (rgb[:, 2] > rgb[:, 0] + 20) & (rgb[:, 2] > rgb[:, 1])
    return float(saturation.mean()), float(blue.mean())


def test_heldout_is_another_distribution_than_train() -> None:
    train, _ = render_scenes(40, size=(64, 64), seed=0, style="train")
    heldout, _ = render_scenes(40, size=(64, 64), seed=0, style="heldout")
    # Another generator: no background family, clutter shape or garment hue in common (the
    # training style's saturated palettes and sharp-edged families are domain randomisation,
    # not the held-out families themselves).
    train_spec, heldout_spec = scenes_module._SPECS["train"], scenes_module._SPECS["heldout"]
    assert not set(train_spec.backgrounds) & set(heldout_spec.backgrounds)
    assert not set(train_spec.clutter) & set(heldout_spec.clutter)
    assert train_spec.hues[1] < heldout_spec.hues[0]
    # Heldout backgrounds are more saturated on the whole (tiles, rings, sky and grass).
    train_sat, _ = _border_and_hue_stats(train)
    heldout_sat, _ = _border_and_hue_stats(heldout)
    assert heldout_sat > train_sat
    # And the frames' high-frequency energy differs (tiles, grass and stronger noise).
    def detail(images: np.ndarray) -> float:
        grey = images.astype(np.float32).mean(axis=3)
        return float(np.abs(np.diff(grey, axis=2)).mean())
    assert detail(heldout) > detail(train)


def test_train_and_test_garments_are_disjoint() -> None:
    train_images, _, _ = garment_set("train")
    test_images, _, _ = garment_set("test")
    train_hashes = {image.tobytes() for image in train_images}
    shared = sum(image.tobytes() in train_hashes for image in test_images)
    # Fashion-MNIST itself has a handful of byte-identical images across its splits; the
    # scenes sets take train-split garments for train and test-split garments for test.
    assert shared < 20


def test_unknown_style_and_bad_size_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown scene style 'night'"):
        render_scenes(1, style="night")
    with pytest.raises(ValueError, match="sides must be in"):
        render_scenes(1, size=(8, 8))


def test_load_dataset_scenes_renders_at_input_size() -> None:
    data = load_dataset("scenes", limit=20, test_limit=10, input_size=48)
    assert data.x_train.shape == (20, 48, 48, 3)
    assert data.x_test.shape == (10, 48, 48, 3)
    assert data.classes == FASHION_MNIST_CLASSES
    assert data.input_shape == (48, 48, 3)
    # The test split is the same style drawn with test-split garments: other images.
    assert not np.array_equal(data.x_train[:10], data.x_test[:10])
    heldout = load_dataset("scenes:heldout", limit=10, test_limit=10, input_size=48)
    assert heldout.name == "scenes:heldout"
    assert not np.array_equal(heldout.x_test, data.x_test)


def test_input_size_resizes_other_datasets_keeping_channels() -> None:
    data = load_dataset("fashion-mnist", limit=5, test_limit=3, input_size=56)
    assert data.x_train.shape == (5, 56, 56, 1)
    assert data.x_test.shape == (3, 56, 56, 1)
    with pytest.raises(OptionError, match="input_size must be in"):
        load_dataset("synthetic", limit=5, input_size=4)
    with pytest.raises(DatasetError, match="unknown dataset 'scenes:night'"):
        load_dataset("scenes:night")


def test_large_scenes_sets_are_cached_under_framecast_home(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAMECAST_HOME", str(tmp_path))
    monkeypatch.setattr("jobs.data.SCENES_CACHE_MIN_PIXELS", 1)
    cache = tmp_path / "datasets" / "scenes"
    first = load_dataset("scenes", limit=6, test_limit=2, input_size=32, seed=5)
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 4 and all("seed5-32px-" in name for name in names)
    again = load_dataset("scenes", limit=6, test_limit=2, input_size=32, seed=5)
    np.testing.assert_array_equal(first.x_train, again.x_train)
    np.testing.assert_array_equal(first.y_test, again.y_test)
    # A smaller set is the start of the larger cached one: read from it, nothing new written.
    smaller = load_dataset("scenes", limit=4, test_limit=2, input_size=32, seed=5)
    assert sorted(p.name for p in cache.iterdir()) == names
    rendered, labels = render_scenes(4, size=(32, 32), seed=5, garments="train")
    np.testing.assert_array_equal(smaller.x_train, rendered)
    np.testing.assert_array_equal(smaller.y_train, labels)


def test_scenes_video_is_deterministic_and_changes_garment_every_hold() -> None:
    video = ScenesVideo(size=(96, 64), stream_index=1, seed=4, hold_frames=5)
    again = ScenesVideo(size=(96, 64), stream_index=1, seed=4, hold_frames=5)
    frames = [video.frame(t) for t in range(15)]
    assert all(f.pixels.shape == (64, 96, 3) and f.pixels.dtype == np.uint8 for f in frames)
    np.testing.assert_array_equal(frames[7].pixels, again.frame(7).pixels)
    assert frames[7].label == again.frame(7).label
    for k in range(3):  # one garment (and label) per segment of hold_frames frames
        assert len({f.label for f in frames[5 * k:5 * k + 5]}) == 1
        assert video.segment(k).label == frames[5 * k].label
    assert all(0 <= f.label <= 9 for f in frames if f.label is not None)
    # The garment moves: consecutive frames of a segment differ.
    assert not np.array_equal(frames[1].pixels, frames[3].pixels)
    other_camera = ScenesVideo(size=(96, 64), stream_index=2, seed=4, hold_frames=5)
    assert not np.array_equal(other_camera.frame(0).pixels, frames[0].pixels)


@pytest.mark.parametrize("encoding", ["jpeg", "png"])
def test_scenes_source_loops_a_pre_encoded_clip_with_labels(encoding: str) -> None:
    source = ScenesSource("scenes", frame_size=(80, 48), hold_frames=4, clip_frames=8,
                          encoding=encoding)
    stream = source.stream(0)
    shots = [next(stream) for _ in range(20)]
    assert source.clip_frames == 8 and source.prerender_s > 0
    assert all(isinstance(s, EncodedFrame) and s.encoding == encoding for s in shots)
    assert [s.data for s in shots[:8]] == [s.data for s in shots[8:16]]  # looped
    assert [s.label for s in shots[:8]] == [s.label for s in shots[8:16]]
    video = ScenesVideo(size=(80, 48), hold_frames=4)
    assert [s.label for s in shots[:8]] == [video.frame(t).label for t in range(8)]
    with Image.open(io.BytesIO(shots[3].data)) as image:
        assert image.format == {"jpeg": "JPEG", "png": "PNG"}[encoding]
        assert image.size == (80, 48) and image.mode == "RGB"
        if encoding == "png":  # lossless: exactly the rendered frame
            np.testing.assert_array_equal(np.asarray(image), video.frame(3).pixels)
    assert shots[0].pixels.shape == (48, 80, 3)


def test_frame_size_options_are_parsed_or_refused_naming_the_option() -> None:
    assert parse_frame_size("640x480") == (640, 480)
    assert parse_frame_size("1920X1080") == (1920, 1080)
    assert parse_frame_size("32") == 32
    for bad in ("10", "8x8", "wide", "640x"):
        with pytest.raises(ProducerOptionError, match="--frame-size"):
            parse_frame_size(bad)
    with pytest.raises(ProducerOptionError, match="--frame-size"):
        ScenesSource("scenes", frame_size=(5000, 100))
    with pytest.raises(SourceError, match="unknown scenes source"):
        ScenesSource("scenes:night")


def test_the_synthetic_camera_refuses_a_non_square_frame_size() -> None:
    from streams.config import KafkaSettings
    from streams.producers import produce_frames

    with pytest.raises(ProducerOptionError, match="synthetic camera's frames are square"):
        produce_frames(KafkaSettings(), None, "synthetic", "frames", 0.0, 1, 1,
                       frame_size=(64, 32))

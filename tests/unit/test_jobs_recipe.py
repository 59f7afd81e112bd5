"""The training-recipe ingredients (jobs/recipe.py) do what they say, on small examples."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from jobs.config import TrainConfig
from jobs.exceptions import OptionError
from jobs.recipe import (
    BatchRecipe,
    Distillation,
    RecipeLoss,
    SavedModelTeacher,
    WarmupThen,
    WeightAverage,
    cutmix,
    distillation_term,
    eval_batch_transform,
    mix_pairs,
    mixup,
    paste_box,
    random_erasing,
    recipe_accuracy,
    train_batch_transform,
)
from jobs.tf_env import keras, tf

CLASSES = 5


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _distinct_batch(height: int = 8, width: int = 8) -> tuple[tf.Tensor, tf.Tensor]:
    """Image k is the constant k + 1 with label k: an output pixel names its source image."""
    images = np.broadcast_to(np.arange(1, CLASSES + 1, dtype=np.float32)[:, None, None, None],
                             (CLASSES, height, width, 1)).copy()
    return tf.constant(images), tf.one_hot(tf.range(CLASSES), CLASSES)


# -- learning-rate warm-up -------------------------------------------------------------------

def test_warmup_climbs_linearly_to_the_peak_then_hands_over_to_the_decay() -> None:
    decay = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=10, alpha=0.0)
    schedule = WarmupThen(1e-3, warmup_steps=4, after=decay)
    values = [float(schedule(step)) for step in range(15)]
    assert values[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert values[4] == pytest.approx(1e-3)            # the decay's step 0
    assert values[9] == pytest.approx(0.5e-3)          # cosine half-way: (1 + cos(pi/2)) / 2
    assert values[14] == pytest.approx(0.0, abs=1e-9)  # the decay's end
    assert float(WarmupThen.from_config(schedule.get_config())(2)) == pytest.approx(7.5e-4)


def test_the_runs_schedule_warms_up_for_its_epochs_and_decays_over_the_rest(
        tmp_path: Path) -> None:
    from jobs.train import _lr_schedule

    config = TrainConfig(model="stream_cnn", dataset="synthetic", epochs=5, out=str(tmp_path),
                         learning_rate=0.01, warmup_epochs=2)
    schedule = _lr_schedule(config, steps_per_epoch=10)
    assert float(schedule(0)) == pytest.approx(0.01 / 20)
    assert float(schedule(19)) == pytest.approx(0.01)
    assert float(schedule(20)) == pytest.approx(0.01)
    assert float(schedule(50)) == pytest.approx(0.01 * 0.02)  # CosineDecay's alpha, at the end
    plain = _lr_schedule(config.model_copy(update={"warmup_epochs": 0}), steps_per_epoch=10)
    assert float(plain(0)) == pytest.approx(0.01)


# -- mixup, CutMix, random erasing -----------------------------------------------------------

def test_mixup_is_the_convex_combination_of_a_pair_with_the_same_label_mix() -> None:
    rng = np.random.default_rng(0)
    images = tf.constant(rng.random((4, 6, 6, 3), dtype=np.float32))
    labels = tf.one_hot([0, 1, 2, 3], CLASSES)
    partner = tf.constant([2, 0, 3, 1])
    mixed, mixed_labels = mix_pairs(images, labels, tf.constant(0.7), partner)
    expected = 0.7 * images.numpy() + 0.3 * images.numpy()[[2, 0, 3, 1]]
    np.testing.assert_allclose(mixed.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(mixed_labels.numpy()[0], [0.7, 0, 0.3, 0, 0], atol=1e-6)


def test_sampled_mixup_images_are_their_labels_mix_of_the_batch() -> None:
    tf.random.set_seed(1)
    images, labels = _distinct_batch()
    for _ in range(5):
        mixed, mixed_labels = mixup(images, labels, alpha=0.4)
        weights = mixed_labels.numpy()
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
        assert (weights >= 0).all()
        # Image i is sum_k w_ik * (k + 1): the labels say exactly what was mixed.
        expected = weights @ np.arange(1, CLASSES + 1, dtype=np.float32)
        np.testing.assert_allclose(mixed.numpy()[:, 0, 0, 0], expected, rtol=1e-5)
        assert np.ptp(mixed.numpy(), axis=(1, 2, 3)).max() < 1e-5  # still constant images


def test_cutmix_pastes_a_box_and_mixes_the_labels_by_its_area() -> None:
    images, labels = _distinct_batch()
    partner = tf.constant([1, 2, 3, 4, 0])
    pasted, pasted_labels = paste_box(images, labels, partner, (2, 2, 6, 4))  # 4 x 2 of 8 x 8
    out = pasted.numpy()[0, :, :, 0]
    assert (out[2:6, 2:4] == 2.0).all() and (out == 2.0).sum() == 8 and (out == 1.0).sum() == 56
    np.testing.assert_allclose(pasted_labels.numpy()[0], [56 / 64, 8 / 64, 0, 0, 0], rtol=1e-6)


def test_sampled_cutmix_labels_are_the_share_of_each_images_pixels() -> None:
    tf.random.set_seed(2)
    images, labels = _distinct_batch(12, 12)
    for _ in range(8):
        pasted, pasted_labels = cutmix(images, labels, alpha=1.0)
        for index in range(CLASSES):
            pixels = pasted.numpy()[index, :, :, 0].ravel()
            shares = np.bincount(pixels.astype(int) - 1, minlength=CLASSES) / pixels.size
            np.testing.assert_allclose(pasted_labels.numpy()[index], shares, atol=1e-6)


def test_random_erasing_replaces_one_rectangle_per_chosen_image() -> None:
    tf.random.set_seed(3)
    images = tf.fill([64, 28, 28, 1], 0.5)
    erased = random_erasing(images, probability=1.0).numpy()[..., 0]
    for image in erased:
        changed = image != 0.5
        rows, cols = np.nonzero(changed.any(axis=1))[0], np.nonzero(changed.any(axis=0))[0]
        box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.mean() > 0.95  # one rectangle (noise equal to 0.5 is vanishingly rare)
        assert 0.01 <= box.size / image.size <= 0.4
        assert (image[changed] >= 0).all() and (image[changed] <= 1).all()
    assert (random_erasing(images, probability=0.0).numpy() == 0.5).all()
    some = random_erasing(images, probability=0.5).numpy()
    assert 10 < int((some != 0.5).any(axis=(1, 2, 3)).sum()) < 54


def test_with_mixup_and_cutmix_each_batch_takes_one_of_them() -> None:
    tf.random.set_seed(4)
    images, labels = _distinct_batch()
    recipe = BatchRecipe(CLASSES, mixup=0.4, cutmix=1.0)
    kinds = set()
    for _ in range(20):
        mixed, _ = recipe.mix(images, labels)
        constant = np.ptp(mixed.numpy(), axis=(1, 2, 3)).max() < 1e-5
        integral = np.allclose(mixed.numpy(), np.round(mixed.numpy()))
        kinds.add("mixup" if constant and not integral else "cutmix" if integral else "?")
    assert kinds == {"mixup", "cutmix"}


def test_the_batch_transforms_one_hot_and_append_the_teachers_view() -> None:
    images, _ = _distinct_batch()
    sparse = tf.range(CLASSES, dtype=tf.int64)
    seen: list[tf.Tensor] = []

    def teacher(batch: tf.Tensor) -> tf.Tensor:
        seen.append(batch)
        return tf.nn.softmax(tf.reduce_mean(batch, axis=[1, 2]) * tf.ones([1, CLASSES]))

    out, targets = train_batch_transform(BatchRecipe(CLASSES, mixup=0.2), teacher)(images, sparse)
    assert targets.shape == (CLASSES, 2 * CLASSES)
    np.testing.assert_allclose(targets.numpy()[:, CLASSES:], 1 / CLASSES, rtol=1e-6)
    assert seen[0] is out  # the teacher saw the mixed images the student trains on
    plain, onehot = eval_batch_transform(CLASSES)(images, sparse)
    assert plain is images
    np.testing.assert_array_equal(onehot.numpy(), np.eye(CLASSES))


# -- distillation and the loss ------------------------------------------------------------------

def test_the_distillation_term_on_probabilities_is_the_kl_of_the_softened_logits() -> None:
    teacher_logits = np.array([[2.0, 0.5, -1.0], [0.1, 3.0, 0.0]])
    student_logits = np.array([[1.0, 1.0, 0.0], [-2.0, 0.5, 1.5]])
    temperature = 4.0
    p = _softmax(teacher_logits / temperature)
    q = _softmax(student_logits / temperature)
    by_hand = temperature ** 2 * (p * np.log(p / q)).sum(axis=1)
    term = distillation_term(tf.constant(_softmax(teacher_logits), tf.float32),
                             tf.constant(_softmax(student_logits), tf.float32), temperature)
    np.testing.assert_allclose(term.numpy(), by_hand, rtol=1e-4)


def test_the_recipe_loss_equals_a_hand_computation() -> None:
    classes = 3
    labels = np.array([[1.0, 0.0, 0.0], [0.0, 0.4, 0.6]])  # a plain and a mixed label
    teacher = _softmax(np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 1.0]]))
    student = _softmax(np.array([[1.0, 0.5, 0.0], [0.0, 0.0, 2.0]]))
    alpha, temperature, smoothing = 0.3, 2.0, 0.1
    smoothed = labels * (1 - smoothing) + smoothing / classes
    cross_entropy = -(smoothed * np.log(student)).sum(axis=1)
    p = _softmax(np.log(teacher) / temperature)
    q = _softmax(np.log(student) / temperature)
    kl = (p * np.log(p / q)).sum(axis=1)
    by_hand = np.mean(alpha * temperature ** 2 * kl + (1 - alpha) * cross_entropy)
    loss = RecipeLoss(classes, smoothing, Distillation(alpha, temperature))
    y_true = tf.constant(np.concatenate([labels, teacher], axis=1), tf.float32)
    y_pred = tf.constant(student, tf.float32)
    assert float(loss(y_true, y_pred)) == pytest.approx(by_hand, rel=1e-5)
    # Validation batches carry the labels only: the smoothed cross-entropy alone.
    assert float(loss(tf.constant(labels, tf.float32), y_pred)) == pytest.approx(
        cross_entropy.mean(), rel=1e-5)
    # No smoothing and no teacher: Keras' sparse cross-entropy of the integer labels.
    sparse = keras.losses.sparse_categorical_crossentropy([0, 2], y_pred).numpy().mean()
    onehot = tf.one_hot([0, 2], classes)
    assert float(RecipeLoss(classes)(onehot, y_pred)) == pytest.approx(sparse, rel=1e-5)


def test_accuracy_reads_the_labels_in_front_of_the_teachers_probabilities() -> None:
    metric = recipe_accuracy(3)
    y_true = tf.constant([[0.0, 0.3, 0.7, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
    metric.update_state(y_true, tf.constant([[0.1, 0.1, 0.8], [0.1, 0.8, 0.1]]))
    assert metric.name == "accuracy" and float(metric.result()) == 0.5


def test_a_saved_model_teacher_gives_its_models_probabilities(tmp_path: Path) -> None:
    from jobs.export import save_float_saved_model
    from jobs.models import ModelSpec, build_model

    model = build_model(ModelSpec("stream_cnn"), (28, 28, 1), 10)
    save_float_saved_model(model, tmp_path / "saved_model")
    images = tf.random.uniform([4, 28, 28, 1], seed=5)
    teacher = SavedModelTeacher(tmp_path)
    np.testing.assert_allclose(teacher(images).numpy(), model(images, training=False).numpy(),
                               rtol=1e-5, atol=1e-6)
    # It runs inside tf.data (where the training pipeline calls it).
    data = tf.data.Dataset.from_tensors(images).map(teacher)
    np.testing.assert_allclose(next(iter(data)).numpy().sum(axis=1), 1.0, rtol=1e-5)


# -- weight averaging -----------------------------------------------------------------------------

def _small_model() -> keras.Model:
    inputs = keras.Input(shape=(4,))
    hidden = keras.layers.Dense(8, name="hidden")(inputs)
    hidden = keras.layers.BatchNormalization(name="bn")(hidden)
    outputs = keras.layers.Dense(3, activation="softmax", name="out")(hidden)
    return keras.Model(inputs, outputs)


def test_the_average_moves_toward_the_models_weights() -> None:
    model = _small_model()
    average = WeightAverage(model, decay=0.9)
    start = [a.numpy() for a in average.averages]
    assert len(start) == len(model.weights)  # BatchNorm's moving statistics included
    target = [w + 1.0 for w in model.get_weights()]
    model.set_weights(target)
    average.update()
    decay = min(0.9, 2 / 11)  # the warm-up of the decay after one update
    for before, after, goal in zip(start, average.averages, target, strict=True):
        np.testing.assert_allclose(after.numpy(), decay * before + (1 - decay) * goal,
                                   rtol=1e-5)
    gaps = []
    for _ in range(30):
        average.update()
        gaps.append(max(float(np.abs(a.numpy() - g).max())
                        for a, g in zip(average.averages, target, strict=True)))
    assert all(b <= a + 1e-6 for a, b in itertools.pairwise(gaps))
    assert gaps[-1] < 0.05


def test_validation_runs_on_the_averages_and_training_resumes_on_the_raw_weights() -> None:
    model = _small_model()
    average = WeightAverage(model, decay=0.5)
    raw = [w + 2.0 for w in model.get_weights()]
    model.set_weights(raw)
    average.on_test_begin()
    assert all(np.allclose(w, a.numpy()) for w, a in
               zip(model.get_weights(), average.averages, strict=True))
    average.on_test_end()
    assert all(np.array_equal(w, r) for w, r in zip(model.get_weights(), raw, strict=True))


def test_averaged_pruned_kernels_get_the_masks_zeros_back() -> None:
    import tensorflow_model_optimization as tfmot
    from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import (
        PruneLowMagnitude,
    )

    model = tfmot.sparsity.keras.prune_low_magnitude(
        _small_model(), pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.5, 0))
    average = WeightAverage(model, decay=0.9)
    wrapper = next(m for m in model.submodules if isinstance(m, PruneLowMagnitude))
    kernel, mask, _ = wrapper.pruning_vars[0]
    averaged = {a.ref() for a in average.averages}
    assert all(v.ref() not in averaged for v in (mask, wrapper.pruning_step))
    half = np.zeros(mask.shape, np.float32)
    half.flat[::2] = 1.0
    mask.assign(half)
    average.copy_to_model()  # the averages (unpruned kernels), masked
    assert (kernel.numpy()[half == 0] == 0).all() and (kernel.numpy()[half == 1] != 0).all()


def test_the_export_restores_the_averages_from_the_checkpoint(tmp_path: Path) -> None:
    from jobs.train import (
        CHECKPOINT_AVERAGE,
        CHECKPOINT_PROGRESS,
        CHECKPOINT_STATE,
        build_training_model,
        restore_trained_model,
    )

    config = TrainConfig(model="stream_cnn", dataset="synthetic", epochs=2, out=str(tmp_path),
                         prune="constant", target_sparsity=0.5, ema=0.99)
    model, plan = build_training_model(config, (28, 28, 1), 10, steps_per_epoch=10)
    average = WeightAverage(model, config.ema)
    for value in average.averages:
        value.assign(value + 0.25)
    wrapper = model.get_layer("prune_low_magnitude_conv3")
    _, mask, _ = wrapper.pruning_vars[0]
    mask.assign(tf.cast(tf.random.uniform(mask.shape, seed=6) < 0.5, mask.dtype))
    checkpoint = tmp_path / "checkpoint"
    tf.train.Checkpoint(model=model, **{CHECKPOINT_AVERAGE: average.trackable}).write(
        str(checkpoint / CHECKPOINT_STATE))
    (checkpoint / CHECKPOINT_PROGRESS).write_text(json.dumps({"epoch": 2}))
    restored, _, progress = restore_trained_model(config, checkpoint, (28, 28, 1), 10, 10)
    assert progress["epoch"] == 2
    index = [v.ref() for v in average.sources].index(wrapper.layer.kernel.ref())
    expected = average.averages[index].numpy() * mask.numpy()
    np.testing.assert_allclose(restored.get_layer("conv3").kernel.numpy(), expected, rtol=1e-6)
    assert math.isclose(float((restored.get_layer("conv3").kernel.numpy() == 0).mean()),
                        float((mask.numpy() == 0).mean()), abs_tol=1e-6)
    plain = tmp_path / "plain"
    tf.train.Checkpoint(model=model).write(str(plain / CHECKPOINT_STATE))
    (plain / CHECKPOINT_PROGRESS).write_text(json.dumps({"epoch": 2}))
    with pytest.raises(OptionError, match=r"--ema 0.99: the checkpoint .* no weight averages"):
        restore_trained_model(config, plain, (28, 28, 1), 10, 10)
    assert plan.enabled


# -- the teacher's checks at start-up --------------------------------------------------------

def test_a_missing_or_mismatched_teacher_is_refused_naming_the_flag(tmp_path: Path) -> None:
    from jobs.train import check_teacher_fits, validate_config

    config = TrainConfig(model="stream_cnn", dataset="synthetic", epochs=1,
                         out=str(tmp_path / "out"), teacher=str(tmp_path / "nowhere"))
    with pytest.raises(OptionError, match=r"^--teacher .*nowhere: not a usable framecast"):
        validate_config(config)
    shipped = Path(__file__).parents[2] / "models" / "fashion_mnist_stream"
    check_teacher_fits(str(shipped), tuple(json.loads(
        (shipped / "manifest.json").read_text())["classes"]), (28, 28, 1))
    with pytest.raises(OptionError, match=r"^--teacher .* other classes"):
        check_teacher_fits(str(shipped), tuple(f"pattern-{i}" for i in range(10)), (28, 28, 1))
    with pytest.raises(OptionError, match=r"^--teacher .* shape \(28, 28, 1\)"):
        check_teacher_fits(str(shipped), tuple(json.loads(
            (shipped / "manifest.json").read_text())["classes"]), (32, 32, 1))

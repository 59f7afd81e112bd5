"""Training-recipe ingredients (issue 22): warm-up, batch mixing, random erasing, label
smoothing, distillation and weight averaging.

Each ingredient is a ``framecast train`` option (jobs/config.py) and is off by default; the
training loop (jobs/train.py) puts them together:

- :class:`WarmupThen`: a linear learning-rate warm-up, then the run's cosine or exponential
  decay.
- :func:`train_batch_transform`: the per-batch part of the ``tf.data`` pipeline after
  batching and ``augment_batch``: labels one-hot, :func:`random_erasing` per image, then
  :func:`mixup` or :func:`cutmix` per batch, then the teacher's probabilities appended to
  the labels (distillation).
- :class:`RecipeLoss`: cross-entropy on the (smoothed, mixed) one-hot labels, plus the
  distillation term when the labels carry a teacher's probabilities.
- :class:`WeightAverage`: an exponential moving average of the weights, swapped in for
  validation and written beside the raw weights in every checkpoint; the export uses it.

The models end in a softmax and are served that way, so the distillation term works on
log-probabilities instead of logits: ``log softmax(z) = z - logsumexp(z)`` differs from the
logits ``z`` by one constant per image, and ``softmax((z - c) / T) = softmax(z / T)``, so
the softened distributions are exactly those of the logits (up to the floor under tiny
probabilities, :data:`LOG_FLOOR`). No model changes, and the exported and int8 models are
the same graphs as without distillation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import (
    PruneLowMagnitude,
)

from jobs.tf_env import keras, tf

# log(p) is taken of max(p, LOG_FLOOR): far below any probability that matters (exp(-69)),
# still a normal float32. Keras' cross-entropy clips at 1e-7, which would flatten the very
# small probabilities that a temperature of 4 lifts into view (1e-12 ** (1/4) = 1e-3).
LOG_FLOOR = 1e-30
# Random erasing (Zhong et al. 2020): the erased area's fraction of the image and its
# aspect ratio (height / width) are drawn uniformly from these ranges (log-uniform ratio).
ERASE_AREA = (0.02, 0.33)
ERASE_ASPECT = (0.3, 1.0 / 0.3)
# The average's decay grows with its updates, min(decay, (1 + n) / (10 + n)), as
# tf.train.ExponentialMovingAverage's num_updates does: early averages are not dominated
# by the random initial weights (a short run would otherwise export them).
EMA_WARMUP = 10.0

BatchTransform = Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
Teacher = Callable[[tf.Tensor], tf.Tensor]


# -- the learning-rate schedule ----------------------------------------------------------------

class WarmupThen(keras.optimizers.schedules.LearningRateSchedule):
    """``peak * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, then
    ``after(step - warmup_steps)`` (``after`` starts at ``peak``)."""

    def __init__(self, peak: float, warmup_steps: int,
                 after: keras.optimizers.schedules.LearningRateSchedule) -> None:
        super().__init__()
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.after = after

    def __call__(self, step: Any) -> tf.Tensor:
        step = tf.cast(step, tf.float32)
        warm = self.peak * (step + 1.0) / float(self.warmup_steps)
        decayed = self.after(tf.maximum(step - float(self.warmup_steps), 0.0))
        return tf.where(step < float(self.warmup_steps), warm, tf.cast(decayed, tf.float32))

    def get_config(self) -> dict[str, Any]:
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "after": keras.optimizers.schedules.serialize(self.after)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> WarmupThen:
        after = keras.optimizers.schedules.deserialize(config["after"])
        return cls(config["peak"], config["warmup_steps"], after)


# -- per-batch transforms (tf.data, after batching) -----------------------------------------------

def sample_beta(alpha: float) -> tf.Tensor:
    """One draw of Beta(alpha, alpha) (the ratio of two Gamma(alpha) draws)."""
    first = tf.random.gamma([], alpha)
    second = tf.random.gamma([], alpha)
    return first / tf.maximum(first + second, 1e-12)


def mix_pairs(images: tf.Tensor, labels: tf.Tensor, lam: tf.Tensor,
              partner: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Mixup with a given weight and pairing: ``lam * x + (1 - lam) * x[partner]``, and the
    same convex combination of the one-hot labels."""
    lam = tf.cast(lam, images.dtype)
    images = lam * images + (1.0 - lam) * tf.gather(images, partner)
    labels = lam * labels + (1.0 - lam) * tf.gather(labels, partner)
    return images, labels


def mixup(images: tf.Tensor, labels: tf.Tensor, alpha: float) -> tuple[tf.Tensor, tf.Tensor]:
    """Mixup (Zhang et al. 2018): one Beta(alpha, alpha) weight per batch, each image paired
    with a random other image of the batch."""
    partner = tf.random.shuffle(tf.range(tf.shape(images)[0]))
    return mix_pairs(images, labels, sample_beta(alpha), partner)


def paste_box(images: tf.Tensor, labels: tf.Tensor, partner: tf.Tensor,
              box: tuple[Any, Any, Any, Any]) -> tuple[tf.Tensor, tf.Tensor]:
    """CutMix with a given box ``(top, left, bottom, right)`` (end exclusive) and pairing:
    the box of each image is its partner's, and the labels mix by the pixels' shares."""
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    top, left, bottom, right = (tf.cast(v, tf.int32) for v in box)
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    pasted = tf.reduce_mean(tf.cast(inside, labels.dtype))  # the partner's share
    images = tf.where(inside[None, :, :, None], tf.gather(images, partner), images)
    labels = (1.0 - pasted) * labels + pasted * tf.gather(labels, partner)
    return images, labels


def cutmix(images: tf.Tensor, labels: tf.Tensor, alpha: float) -> tuple[tf.Tensor, tf.Tensor]:
    """CutMix (Yun et al. 2019): one box per batch covering about 1 - lam of the image
    (lam ~ Beta(alpha, alpha)), centred anywhere and clipped to the image; the labels mix
    by the area actually pasted."""
    height = tf.cast(tf.shape(images)[1], tf.float32)
    width = tf.cast(tf.shape(images)[2], tf.float32)
    side = tf.sqrt(1.0 - sample_beta(alpha))
    centre_y = tf.random.uniform([], 0.0, height)
    centre_x = tf.random.uniform([], 0.0, width)
    half_h, half_w = side * height / 2.0, side * width / 2.0
    box = (tf.round(tf.clip_by_value(centre_y - half_h, 0.0, height)),
           tf.round(tf.clip_by_value(centre_x - half_w, 0.0, width)),
           tf.round(tf.clip_by_value(centre_y + half_h, 0.0, height)),
           tf.round(tf.clip_by_value(centre_x + half_w, 0.0, width)))
    partner = tf.random.shuffle(tf.range(tf.shape(images)[0]))
    return paste_box(images, labels, partner, box)


def random_erasing(images: tf.Tensor, probability: float) -> tf.Tensor:
    """Random erasing (Zhong et al. 2020): each image, with ``probability``, gets one random
    rectangle (2-33 % of its area, aspect 0.3-3.3) replaced by uniform noise in [0, 1]."""
    shape = tf.shape(images)
    batch = shape[0]
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    area = tf.random.uniform([batch], *ERASE_AREA) * height * width
    log_low, log_high = tf.math.log(ERASE_ASPECT[0]), tf.math.log(ERASE_ASPECT[1])
    aspect = tf.exp(tf.random.uniform([batch], log_low, log_high))
    box_h = tf.minimum(tf.round(tf.sqrt(area * aspect)), height)
    box_w = tf.minimum(tf.round(tf.sqrt(area / aspect)), width)
    top = tf.floor(tf.random.uniform([batch]) * (height - box_h + 1.0))
    left = tf.floor(tf.random.uniform([batch]) * (width - box_w + 1.0))
    rows = tf.range(height)[None, :, None]
    cols = tf.range(width)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + box_h)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + box_w)[:, None, None]))
    erase = tf.random.uniform([batch, 1, 1]) < probability
    mask = (inside & erase)[..., None]
    return tf.where(mask, tf.random.uniform(shape, dtype=images.dtype), images)


@dataclass(frozen=True)
class BatchRecipe:
    """The per-batch ingredients of the training pipeline (all off by default)."""

    num_classes: int
    mixup: float = 0.0
    cutmix: float = 0.0
    random_erasing: float = 0.0

    def mix(self, images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Mixup or CutMix as configured; with both, each batch takes one of them (p=0.5)."""
        if self.mixup > 0 and self.cutmix > 0:
            return tf.cond(tf.random.uniform([]) < 0.5,
                           lambda: mixup(images, labels, self.mixup),
                           lambda: cutmix(images, labels, self.cutmix))
        if self.mixup > 0:
            return mixup(images, labels, self.mixup)
        if self.cutmix > 0:
            return cutmix(images, labels, self.cutmix)
        return images, labels


def eval_batch_transform(num_classes: int) -> BatchTransform:
    """Validation batches: labels one-hot (RecipeLoss takes them), images untouched."""

    def transform(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return images, tf.one_hot(labels, num_classes, dtype=tf.float32)

    return transform


def train_batch_transform(recipe: BatchRecipe, teacher: Teacher | None = None) -> BatchTransform:
    """Training batches: labels one-hot, random erasing, mixup/CutMix, then (with a
    teacher) the teacher's probabilities for the images as they are now, appended to the
    labels ([batch, 2 * classes]): the teacher sees exactly what the student sees."""

    def transform(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        labels = tf.one_hot(labels, recipe.num_classes, dtype=tf.float32)
        if recipe.random_erasing > 0:
            images = random_erasing(images, recipe.random_erasing)
        images, labels = recipe.mix(images, labels)
        if teacher is not None:
            labels = tf.concat([labels, tf.cast(teacher(images), tf.float32)], axis=-1)
        return images, labels

    return transform


# -- distillation and the loss ------------------------------------------------------------------

class SavedModelTeacher:
    """A teacher artifact's float SavedModel: images [N,H,W,C] in [0, 1] -> probabilities
    (inference mode). It holds the loaded object: its variables live as long as it does."""

    def __init__(self, artifact: str | Path) -> None:
        self.loaded = tf.saved_model.load(str(Path(artifact) / "saved_model"))
        self._serve = self.loaded.signatures["serving_default"]

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        return self._serve(images=images)["probabilities"]


def _log(probabilities: tf.Tensor) -> tf.Tensor:
    return tf.math.log(tf.maximum(probabilities, LOG_FLOOR))


def distillation_term(teacher_probs: tf.Tensor, student_probs: tf.Tensor,
                      temperature: float) -> tf.Tensor:
    """Per image: ``T^2 * KL(softmax(log t / T) || softmax(log s / T))``."""
    soft_teacher = tf.nn.softmax(_log(teacher_probs) / temperature)
    log_soft_student = tf.nn.log_softmax(_log(student_probs) / temperature)
    log_soft_teacher = tf.nn.log_softmax(_log(teacher_probs) / temperature)
    kl = tf.reduce_sum(soft_teacher * (log_soft_teacher - log_soft_student), axis=-1)
    return temperature ** 2 * kl


@dataclass(frozen=True)
class Distillation:
    """``alpha * T^2 * KL + (1 - alpha) * CE`` (Hinton et al. 2015)."""

    alpha: float
    temperature: float


class RecipeLoss(keras.losses.Loss):
    """Cross-entropy on one-hot (smoothed, mixed) labels [batch, classes]; with labels
    [batch, 2 * classes] (the teacher's probabilities appended, training only) the
    distillation loss. Per image; Keras reduces it over the global batch."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.0,
                 distillation: Distillation | None = None, name: str = "recipe_loss",
                 **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.distillation = distillation

    def call(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        labels = y_true[:, :self.num_classes]
        cross_entropy = keras.losses.categorical_crossentropy(
            labels, y_pred, label_smoothing=self.label_smoothing)
        if self.distillation is None or y_true.shape[-1] != 2 * self.num_classes:
            return cross_entropy  # no teacher, or a validation batch (labels only)
        alpha = self.distillation.alpha
        distilled = distillation_term(y_true[:, self.num_classes:], y_pred,
                                      self.distillation.temperature)
        return alpha * distilled + (1.0 - alpha) * cross_entropy

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = super().get_config()
        distillation = self.distillation
        return {**config, "num_classes": self.num_classes,
                "label_smoothing": self.label_smoothing,
                "distillation": None if distillation is None else
                [distillation.alpha, distillation.temperature]}


def recipe_accuracy(num_classes: int) -> keras.metrics.Metric:
    """Accuracy against the labels' argmax (the mixed label's larger share), whatever
    RecipeLoss's labels carry after them; logged as ``accuracy``."""

    def accuracy(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        return keras.metrics.categorical_accuracy(y_true[:, :num_classes], y_pred)

    return keras.metrics.MeanMetricWrapper(accuracy, name="accuracy")


# -- weight averaging -----------------------------------------------------------------------------

class WeightAverage(keras.callbacks.Callback):
    """Exponential moving average of a model's float weights (BatchNorm statistics included,
    pruning masks and thresholds not), updated after every training step.

    Validation runs on the averages (swapped in at ``on_test_begin``, the raw weights back
    at ``on_test_end``); :attr:`trackable` goes into the training checkpoint beside the raw
    weights (which resume training), and :meth:`copy_to_model` puts the averages into the
    model for the export. Pruning: the wrapped layers' kernels are averaged like any weight,
    and every copy to the model multiplies them by the layers' current masks again, so the
    averages of weights pruned during the run (not exactly zero yet) are zero again and the
    sparsity is the mask's.

    Build it under the strategy's scope (its variables are then mirrored like the model's);
    its updates run in cross-replica context and each worker averages its own copy of the
    (identical) weights, so no collective is needed.
    """

    def __init__(self, model: keras.Model, decay: float) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self._supports_tf_logs = True  # no per-step conversion of the logs to numpy
        self.decay = decay
        wrappers = [m for m in model.submodules if isinstance(m, PruneLowMagnitude)]
        bookkeeping = {v.ref() for w in wrappers for _, mask, threshold in w.pruning_vars
                       for v in (mask, threshold)}
        self._sources = [v for v in model.weights
                         if v.dtype.is_floating and v.ref() not in bookkeeping]
        self._masks = [(weight, mask) for w in wrappers for weight, mask, _ in w.pruning_vars]
        self.trackable = tf.Module(name="weight_average")
        self.trackable.averages = [
            tf.Variable(v.read_value(), trainable=False, name=f"average_{i}")
            for i, v in enumerate(self._sources)]
        self.trackable.updates = tf.Variable(0, dtype=tf.int64, trainable=False,
                                             name="updates")
        self._saved: list[tf.Tensor] | None = None

    @property
    def averages(self) -> list[tf.Variable]:
        """The averaged weights, in the order of :attr:`sources`."""
        return list(self.trackable.averages)

    @property
    def sources(self) -> list[tf.Variable]:
        """The model's weights that are averaged."""
        return list(self._sources)

    @tf.function
    def update(self) -> None:
        """One step of the average: ``a -= (1 - d) * (a - w)``, ``d = min(decay, (1 + n) /
        (10 + n))`` after n updates."""
        self.trackable.updates.assign_add(1)
        count = tf.cast(self.trackable.updates, tf.float32)
        decay = tf.minimum(self.decay, (1.0 + count) / (EMA_WARMUP + count))
        for average, weight in zip(self.trackable.averages, self._sources, strict=True):
            average.assign_sub((1.0 - decay) * (average - weight))

    def copy_to_model(self) -> None:
        """Put the averages into the model's weights, pruning masks applied."""
        for average, weight in zip(self.trackable.averages, self._sources, strict=True):
            weight.assign(average)
        for weight, mask in self._masks:
            weight.assign(weight * tf.cast(mask, weight.dtype))

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.update()

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._saved = [v.read_value() for v in self._sources]
        self.copy_to_model()

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._saved is None:
            return
        for weight, saved in zip(self._sources, self._saved, strict=True):
            weight.assign(saved)
        self._saved = None

"""``TrainConfig``: every setting of one training run, once (no TensorFlow import).

The ``framecast train`` flags are generated from these fields (cluster/config_flags.py), so
a field's type, default, choices and description here are the flag's; ``submit train``
validates its training flags with the same model before it sends anything to a cluster. The
checks that need the filesystem (the dataset folder, weights file, checkpoint, ``out``)
happen where the run starts, in :func:`jobs.train.validate_config`.
"""

from __future__ import annotations

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    field_validator,
)

from jobs.names import (
    DEFAULT_TARGET_SPARSITY,
    TARGETED_SCHEDULES,
    AugmentPolicy,
    LrSchedule,
    ModelName,
    PruneSchedule,
    QuantizeMode,
    validate_dataset_name,
    validate_target_sparsity,
)

DEFAULT_DISTILL_ALPHA = 0.5
DEFAULT_DISTILL_TEMPERATURE = 4.0


class TrainConfig(BaseModel):
    """Everything one training run needs; sent to every Ray Train worker as JSON.

    Cross-field rules live in the validator of the later field (pydantic validates fields in
    order), so each error names the field the user should change.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # -- what to train, on what, and where the artifact goes
    model: ModelName = Field(description="Model architecture to train.")
    dataset: str = Field(description="fashion-mnist | folder:PATH | synthetic | scenes | "
                                     "scenes:heldout.")
    epochs: PositiveInt = Field(description="Training epochs (early stopping may end sooner).")
    out: str = Field(description="Artifact directory, or s3://, gs://, file:// URI, to write.")
    limit: PositiveInt | None = Field(
        default=None, description="Use only N training images (default: all).")
    test_limit: PositiveInt | None = Field(
        default=None, description="Evaluate on N test images (default: all).")
    input_size: int | None = Field(
        default=None, ge=16, le=1024,
        description="Train on N x N images: scenes are rendered at N (default 224), other "
                    "datasets resized to N (default: the dataset's own size).")
    # -- Ray Train resources
    workers: PositiveInt = Field(default=1, description="Ray Train workers.")
    gpus_per_worker: NonNegativeFloat = Field(default=0.0, description="GPUs per worker.")
    cpus_per_worker: PositiveFloat | None = Field(
        default=None, description="CPUs per worker (default: the CPUs free at start, split "
                                  "evenly among the workers).")
    batch_size: PositiveInt = Field(
        default=128, description="Global batch size (all workers together); >= workers.")
    # -- optimization
    prune: PruneSchedule = Field(
        default="none", description="Magnitude-pruning schedule (tfmot).")
    target_sparsity: float | None = Field(
        default=None, validate_default=True,
        description=f"Final fraction of zero weights, in (0, 1), for --prune "
                    f"{' or '.join(TARGETED_SCHEDULES)} (default {DEFAULT_TARGET_SPARSITY} "
                    f"with them; refused with none and 2:4).")
    quantize: QuantizeMode = Field(
        default="int8", description="LiteRT export (none: the float SavedModel only).")
    qat: bool = Field(
        default=False, description="Quantization-aware fine-tune before the int8 export "
                                   "(keeps sparsity); needs --quantize int8.")
    qat_epochs: PositiveInt = Field(default=2, description="Epochs of the --qat fine-tune.")
    alpha: PositiveFloat = Field(default=0.35, description="mobilenet_v2 width multiplier.")
    weights: str = Field(default="none", description="mobilenet_v2: none | imagenet | PATH.")
    # -- the optimizer and the loop
    learning_rate: PositiveFloat = Field(default=2e-3, description="Adam initial learning rate.")
    lr_schedule: LrSchedule = Field(default="cosine", description="Learning-rate decay.")
    val_fraction: float = Field(
        default=0.1, gt=0.0, lt=0.5,
        description="Fraction of the training images held out for validation.")
    patience: PositiveInt = Field(
        default=5, description="Early-stopping patience in epochs (counted once pruning has "
                               "reached its target).")
    augment: bool = Field(default=True, description="Random rotation/zoom/shift/flip.")
    augment_policy: AugmentPolicy = Field(
        default="standard",
        description="With --augment: standard (rotation, zoom, shift, flip; colour and "
                    "aspect too on scenes) or light (a flip and whole-pixel shifts of up to "
                    "1/14 of the side, no resampling).")
    seed: int = Field(default=0, description="Random seed.")
    max_failures: int = Field(
        default=2, ge=-1, description="Worker-group restarts after a failure (-1: no limit).")
    # -- the training recipe (jobs/recipe.py; docs/training.md, "Recipe options")
    label_smoothing: float = Field(
        default=0.0, ge=0.0, lt=1.0,
        description="Label smoothing of the cross-entropy (0: none).")
    mixup: NonNegativeFloat = Field(
        default=0.0, description="Mixup Beta(a, a) parameter, per batch (0: off; with "
                                 "--cutmix each batch takes one of the two).")
    cutmix: NonNegativeFloat = Field(
        default=0.0, description="CutMix Beta(a, a) parameter, per batch (0: off).")
    random_erasing: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Probability per image of erasing a random rectangle with noise (0: off).")
    warmup_epochs: NonNegativeInt = Field(
        default=0, description="Epochs of linear learning-rate warm-up before the decay; "
                               "< --epochs.")
    ema: float = Field(
        default=0.0, ge=0.0, lt=1.0,
        description="Exponential moving average of the weights with this decay, used for "
                    "validation, the checkpoint's export and the artifact (0: off; e.g. 0.999).")
    teacher: str | None = Field(
        default=None, description="Distil from this framecast artifact directory (with "
                                  "saved_model/, same classes and input shape).")
    distill_alpha: float | None = Field(
        default=None, ge=0.0, le=1.0, validate_default=True,
        description="Weight of the distillation term, the rest on the labels' cross-entropy "
                    f"(default {DEFAULT_DISTILL_ALPHA} with --teacher).")
    distill_temperature: PositiveFloat | None = Field(
        default=None, validate_default=True,
        description=f"Softmax temperature of the distillation term (default "
                    f"{DEFAULT_DISTILL_TEMPERATURE} with --teacher).")
    from_checkpoint: str | None = Field(
        default=None, description="Export from a checkpoint directory of an earlier run (under "
                                  "HOME/train/<run>/checkpoint_*) instead of training; pass "
                                  "that run's options.")
    init_from: str | None = Field(
        default=None, description="Start from the weights of an earlier run of the same "
                                  "--model (its run directory HOME/train/<run>, for its last "
                                  "checkpoint, or one checkpoint_* in it), at any "
                                  "--input-size for the fully convolutional models (train "
                                  "small, fine-tune at full size); the optimizer, schedule "
                                  "and epochs start afresh.")
    # -- set by callers, not by flags (cluster/cli.py leaves them off the command line)
    storage_path: str | None = Field(
        default=None, description="Ray Train storage (default: HOME/train).")
    run_name: str | None = Field(
        default=None, description="Ray Train run name (default: <model>-<UTC time>).")

    @field_validator("dataset")
    @classmethod
    def _validate_dataset(cls, dataset: str) -> str:
        validate_dataset_name(dataset)
        return dataset

    @field_validator("batch_size")
    @classmethod
    def _validate_batch_size(cls, batch_size: int, info: ValidationInfo) -> int:
        workers = info.data.get("workers")
        if workers is not None and batch_size < workers:
            raise ValueError(f"batch_size ({batch_size}) must be >= workers ({workers})")
        return batch_size

    @field_validator("target_sparsity")
    @classmethod
    def _validate_target_sparsity(cls, target: float | None,
                                  info: ValidationInfo) -> float | None:
        schedule = info.data.get("prune")
        if schedule is None:  # prune itself was refused; that error says it all
            return target
        if schedule not in TARGETED_SCHEDULES:
            if target is not None:
                raise ValueError(f"only for --prune {' or '.join(TARGETED_SCHEDULES)}, not "
                                 f"--prune {schedule}"
                                 + (" (2:4 always prunes half the weights)"
                                    if schedule == "2:4" else ""))
            return None
        target = DEFAULT_TARGET_SPARSITY if target is None else target
        validate_target_sparsity(schedule, target)
        return target

    @field_validator("qat")
    @classmethod
    def _validate_qat(cls, qat: bool, info: ValidationInfo) -> bool:
        if not qat:
            return qat
        if info.data.get("quantize", "int8") != "int8":
            raise ValueError("--qat needs --quantize int8")
        if info.data.get("model") == "mobilenet_v2":
            raise ValueError("--qat works for baseline_cnn and optimized_cnn; tfmot cannot "
                             "quantize mobilenet_v2's Resizing/Rescaling layers (use "
                             "post-training int8)")
        return qat

    @field_validator("weights")
    @classmethod
    def _validate_weights(cls, weights: str, info: ValidationInfo) -> str:
        model = info.data.get("model")
        if weights != "none" and model is not None and model != "mobilenet_v2":
            raise ValueError(f"--weights is only for mobilenet_v2, not {model}")
        return weights

    @field_validator("warmup_epochs")
    @classmethod
    def _validate_warmup_epochs(cls, warmup: int, info: ValidationInfo) -> int:
        epochs = info.data.get("epochs")
        if warmup and epochs is not None and warmup >= epochs:
            raise ValueError(f"--warmup-epochs ({warmup}) must be < --epochs ({epochs}): the "
                             "decay needs at least one epoch")
        return warmup

    @field_validator("teacher")
    @classmethod
    def _validate_teacher(cls, teacher: str | None) -> str | None:
        if teacher is not None and not teacher.strip():
            raise ValueError("--teacher needs an artifact directory")
        return teacher

    @field_validator("init_from")
    @classmethod
    def _validate_init_from(cls, init_from: str | None, info: ValidationInfo) -> str | None:
        if init_from is None:
            return None
        if not init_from.strip():
            raise ValueError("--init-from needs a checkpoint directory")
        if info.data.get("from_checkpoint") is not None:
            raise ValueError("--init-from starts a training; --from-checkpoint exports one "
                             "without training: pass one of them")
        return init_from

    @field_validator("distill_alpha", "distill_temperature")
    @classmethod
    def _validate_distillation(cls, value: float | None, info: ValidationInfo) -> float | None:
        if "teacher" not in info.data:  # teacher itself was refused; that error says it all
            return value
        flag = "--" + str(info.field_name).replace("_", "-")
        if info.data["teacher"] is None:
            if value is not None:
                raise ValueError(f"{flag} needs --teacher")
            return None
        if value is not None:
            return value
        return (DEFAULT_DISTILL_ALPHA if info.field_name == "distill_alpha"
                else DEFAULT_DISTILL_TEMPERATURE)

"""Ray Train (V2) multi-worker training with MultiWorkerMirroredStrategy, pruning and export.

The driver (:func:`train_artifact`) validates the options, runs a ``TensorflowTrainer`` whose
workers train with ``MultiWorkerMirroredStrategy`` (one worker: the default strategy, or
``MirroredStrategy`` over its GPUs) and report a checkpoint every epoch, then
rebuilds the model from the final checkpoint, strips pruning, exports the float SavedModel and
the LiteRT model, evaluates both on the test split and writes the artifact directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jobs.config import TrainConfig  # the run's settings; here for the callers of train_artifact
from jobs.exceptions import OptionError, TrainingError
from serving.artifacts import MANIFEST_NAME
from serving.exceptions import UserError

CHECKPOINT_STATE = "state"
CHECKPOINT_PROGRESS = "progress.json"
CHECKPOINT_AVERAGE = "weight_average"  # --ema: the averages, beside the raw weights
CALIBRATION_SAMPLES = 500
ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"


def validate_config(config: TrainConfig) -> None:
    """Check what TrainConfig cannot see from its fields alone: the files it names, on this
    machine (cheap: no TensorFlow import)."""
    if config.weights not in ("none", "imagenet") and not Path(config.weights).is_file():
        raise OptionError(f"--weights {config.weights}: no such weights file")
    for flag, given in (("--from-checkpoint", config.from_checkpoint),
                        ("--init-from", config.init_from)):
        if given is None:
            continue
        checkpoint = Path(given) if flag == "--from-checkpoint" else latest_checkpoint(given)
        missing = [n for n in (CHECKPOINT_PROGRESS, f"{CHECKPOINT_STATE}.index")
                   if not (checkpoint / n).is_file()]
        if missing:
            raise OptionError(f"{flag} {checkpoint} is not a framecast training "
                             f"checkpoint (missing {', '.join(missing)})")
    if config.teacher is not None and config.from_checkpoint is None:
        teacher_manifest(config.teacher)
    target = out_location(config.out)
    if not isinstance(target, str):  # an object store: it answers, and the prefix can take it
        from serving.storage import check_out

        try:
            check_out(config.out, storage_settings())
        except UserError as error:
            raise OptionError(str(error)) from None
        return
    out = Path(target)
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / MANIFEST_NAME).is_file())):
        raise OptionError(f"--out {out} exists and is not an artifact directory; "
                         "refusing to overwrite it")


def teacher_manifest(teacher: str) -> Any:
    """The manifest of the ``--teacher`` artifact, verified (checksums) and with a float
    SavedModel; OptionError naming --teacher otherwise."""
    from serving.artifacts import ArtifactError, load_artifact

    try:
        manifest = load_artifact(teacher).manifest
    except ArtifactError as error:
        raise OptionError(f"--teacher {teacher}: not a usable framecast artifact: {error}"
                          ) from None
    if not (Path(teacher) / "saved_model" / "saved_model.pb").is_file():
        raise OptionError(f"--teacher {teacher}: the artifact has no float SavedModel "
                          "(saved_model/), which distillation runs")
    return manifest


def latest_checkpoint(given: str) -> Path:
    """--init-from's checkpoint: the directory itself, or for a run directory
    (``HOME/train/<run>``) its last complete ``checkpoint_*`` (the names sort by time)."""
    directory = Path(given)
    if (directory / f"{CHECKPOINT_STATE}.index").is_file() or not directory.is_dir():
        return directory
    complete = sorted(p for p in directory.glob("checkpoint_*") if p.is_dir()
                      and (p / CHECKPOINT_PROGRESS).is_file()
                      and (p / f"{CHECKPOINT_STATE}.index").is_file())
    return complete[-1] if complete else directory


def recipe_record(config: TrainConfig) -> dict[str, Any]:
    """The run's recipe for the manifest (``training.recipe``): every ingredient's setting, off
    ones included, the base optimizer settings, and the teacher's identity (the sha256 of its
    manifest.json, its name, version and accuracy; None where its manifest cannot be read)."""
    teacher: dict[str, Any] | None = None
    if config.teacher is not None:
        teacher = {"path": config.teacher, "manifest_sha256": None, "name": None,
                   "version": None, "accuracy": None, "accuracy_runtime": None}
        try:
            raw = (Path(config.teacher) / MANIFEST_NAME).read_bytes()
            manifest = json.loads(raw)
        except (OSError, ValueError):
            manifest = None
        if isinstance(manifest, dict):
            metrics = manifest.get("metrics") or {}
            teacher.update(manifest_sha256=hashlib.sha256(raw).hexdigest(),
                           name=manifest.get("name"), version=manifest.get("version"),
                           accuracy=metrics.get("accuracy"),
                           accuracy_runtime=metrics.get("runtime"))
    return {"label_smoothing": config.label_smoothing, "mixup": config.mixup,
            "cutmix": config.cutmix, "random_erasing": config.random_erasing,
            "warmup_epochs": config.warmup_epochs, "ema": config.ema, "teacher": teacher,
            "distill_alpha": config.distill_alpha,
            "distill_temperature": config.distill_temperature,
            "augment": config.augment, "augment_policy": config.augment_policy,
            "init_from": config.init_from,
            "batch_size": config.batch_size,
            "learning_rate": config.learning_rate, "lr_schedule": config.lr_schedule}


def check_teacher_fits(teacher: str, classes: tuple[str, ...],
                       input_shape: tuple[int, int, int]) -> None:
    """OptionError naming --teacher unless its classes and input shape are the dataset's."""
    manifest = teacher_manifest(teacher)
    if tuple(manifest.classes) != tuple(classes):
        raise OptionError(f"--teacher {teacher} was trained on other classes "
                          f"({', '.join(manifest.classes)}) than the dataset's "
                          f"({', '.join(classes)})")
    if tuple(manifest.input.shape[1:]) != tuple(input_shape):
        raise OptionError(f"--teacher {teacher} takes images of shape "
                          f"{tuple(manifest.input.shape[1:])}, the dataset's are {input_shape} "
                          "(train the teacher at the same --input-size)")


def out_location(out: str) -> Any:
    """``--out`` as a local directory (``file://`` URIs become one) or an object-store URI
    (serving.storage.ArtifactURI); OptionError naming --out for an unsupported one."""
    from serving.storage import StorageError, parse_location

    try:
        return parse_location(out, field="--out")
    except StorageError as error:
        raise OptionError(str(error)) from None


def storage_settings() -> Any:
    """The storage settings (FRAMECAST_STORAGE_* or the AWS variables) for ``--out URI``."""
    from pydantic import ValidationError

    from serving.config import StorageSettings

    try:
        return StorageSettings()
    except ValidationError as error:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in error.errors())
        raise OptionError(f"storage settings: invalid {fields}: {error.errors()[0]['msg']}"
                          ) from None


# -- the worker side --------------------------------------------------------------------------

def _lr_schedule(config: TrainConfig, steps_per_epoch: int) -> Any:
    """The decay over the run's steps after the warm-up (``--warmup-epochs``), if any."""
    from jobs.recipe import WarmupThen
    from jobs.tf_env import keras

    warmup_steps = config.warmup_epochs * steps_per_epoch
    decay: Any
    if config.lr_schedule == "cosine":
        decay = keras.optimizers.schedules.CosineDecay(
            config.learning_rate,
            decay_steps=max(1, steps_per_epoch * config.epochs - warmup_steps), alpha=0.02)
    else:
        decay = keras.optimizers.schedules.ExponentialDecay(
            config.learning_rate, decay_steps=max(1, steps_per_epoch), decay_rate=0.9)
    return WarmupThen(config.learning_rate, warmup_steps, decay) if warmup_steps else decay


def _strategy(tf: Any, world: int) -> Any:
    """MultiWorkerMirroredStrategy across workers (Ray Train sets ``TF_CONFIG``); one worker
    uses MirroredStrategy over its GPUs, or none: with one worker MultiWorkerMirroredStrategy
    only adds collective all-reduces of every gradient, which made each step much slower on
    2 CPU cores (``python -m jobs.step_timing``; the figures are in docs/training.md)."""
    if world > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _onednn_enabled() -> bool | None:
    """Whether this process's TensorFlow runs oneDNN kernels (None if it cannot tell)."""
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:  # a TensorFlow build without the probe
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def _steps_per_epoch(train_count: int, batch_size: int) -> int:
    return max(1, -(-train_count // batch_size))


def build_training_model(config: TrainConfig, input_shape: tuple[int, int, int],
                         num_classes: int, steps_per_epoch: int) -> tuple[Any, Any]:
    """(model with pruning wrappers as configured, pruning plan)."""
    from jobs.models import ModelSpec, build_model
    from jobs.pruning import apply_pruning, plan_pruning

    spec = ModelSpec(config.model, alpha=config.alpha, weights=config.weights)
    plan = plan_pruning(config.prune, config.target_sparsity, steps_per_epoch, config.epochs)
    model = build_model(spec, input_shape, num_classes)
    return apply_pruning(model, plan), plan


def train_loop_per_worker(raw_config: dict[str, Any]) -> None:
    """Ray Train worker: data-parallel training with per-epoch checkpoints."""
    import ray.train

    config = TrainConfig.model_validate(raw_config["config"])
    progress_actor = raw_config.get("progress")
    fail_after_epoch: int | None = raw_config.get("fail_after_epoch")
    from jobs.tf_env import keras, tf

    tf.get_logger().setLevel("ERROR")
    cpus = int(config.cpus_per_worker or 1)
    tf.config.threading.set_intra_op_parallelism_threads(max(1, cpus))
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, cpus)))
    keras.utils.set_random_seed(config.seed)

    from jobs.data import (
        CAMERA_AUGMENTATION,
        LIGHT_AUGMENTATION,
        NO_AUGMENTATION,
        Augmentation,
        load_dataset,
        make_tf_dataset,
        split_train_val,
    )
    from jobs.pruning import pruning_callbacks
    from jobs.recipe import (
        BatchRecipe,
        SavedModelTeacher,
        WeightAverage,
        eval_batch_transform,
        recipe_accuracy,
        train_batch_transform,
    )

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    strategy = _strategy(tf, world)

    data = load_dataset(config.dataset, limit=config.limit, test_limit=1, seed=config.seed,
                        input_size=config.input_size)
    x_train, y_train, x_val, y_val = split_train_val(
        data.x_train, data.y_train, config.val_fraction, config.seed)
    steps_per_epoch = _steps_per_epoch(len(y_train), config.batch_size)
    aug = NO_AUGMENTATION if not config.augment else (
        LIGHT_AUGMENTATION if config.augment_policy == "light" else
        CAMERA_AUGMENTATION if config.dataset.startswith("scenes") else Augmentation())
    classes = len(data.classes)
    # The teacher runs in the input pipeline, outside the strategy (not a mirrored model).
    teacher = SavedModelTeacher(config.teacher) if config.teacher is not None else None
    batch_recipe = BatchRecipe(classes, mixup=config.mixup, cutmix=config.cutmix,
                               random_erasing=config.random_erasing)
    train_ds = make_tf_dataset(x_train, y_train, config.batch_size, training=True,
                               seed=config.seed, aug=aug,
                               batch_transform=train_batch_transform(batch_recipe, teacher))
    val_ds = make_tf_dataset(x_val, y_val, config.batch_size, training=False, seed=config.seed,
                             batch_transform=eval_batch_transform(classes))

    with strategy.scope():
        model, plan = build_training_model(config, data.input_shape, classes, steps_per_epoch)
        optimizer = keras.optimizers.Adam(
            learning_rate=_lr_schedule(config, steps_per_epoch))
        model.compile(optimizer=optimizer, loss=recipe_loss(config, classes),
                      metrics=[recipe_accuracy(classes)])
        average = WeightAverage(model, config.ema) if config.ema > 0 else None

    progress: dict[str, Any] = {"epoch": 0, "best_val_accuracy": -1.0, "wait": 0,
                                "history": [], "early_stopped": False, "resumed_from": None}
    state = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                **({CHECKPOINT_AVERAGE: average.trackable} if average else {}))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state.read(os.path.join(directory, CHECKPOINT_STATE)).expect_partial()
            with open(os.path.join(directory, CHECKPOINT_PROGRESS), encoding="utf-8") as handle:
                progress = json.load(handle)
        progress["resumed_from"] = progress["epoch"]
    elif config.init_from is not None:
        _init_weights(tf, model, Path(config.init_from))
    progress["onednn"] = _onednn_enabled()
    resumed = checkpoint is not None
    prune_end_epoch = -(-plan.end_step // steps_per_epoch) if plan.enabled else 0

    class ReportEpoch(keras.callbacks.Callback):
        """Checkpoint + report to Ray Train every epoch; early stopping on val accuracy."""

        started = time.perf_counter()

        def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            logs = dict(logs or {})
            val_acc = float(logs.get("val_accuracy", 0.0))
            improved = val_acc > progress["best_val_accuracy"] + 1e-4
            progress["best_val_accuracy"] = max(progress["best_val_accuracy"], val_acc)
            # Patience only counts once pruning reached its final sparsity.
            progress["wait"] = 0 if improved or epoch + 1 <= prune_end_epoch \
                else progress["wait"] + 1
            stop = progress["wait"] >= config.patience and epoch + 1 < config.epochs
            progress["epoch"] = epoch + 1
            progress["early_stopped"] = bool(stop)
            record = {k: float(v) for k, v in logs.items()}
            record.update(epoch=float(epoch + 1),
                          epoch_seconds=time.perf_counter() - self.started, lr=float(
                tf.keras.backend.get_value(self.model.optimizer.learning_rate)
                if not callable(self.model.optimizer.learning_rate)
                else self.model.optimizer.learning_rate(self.model.optimizer.iterations)))
            progress["history"].append(record)
            directory = tempfile.mkdtemp(prefix=f"framecast-ckpt-{rank}-")
            state.write(os.path.join(directory, CHECKPOINT_STATE))  # every rank: collectives
            with open(os.path.join(directory, CHECKPOINT_PROGRESS), "w",
                      encoding="utf-8") as handle:
                json.dump(progress, handle)
            metrics = {**record, "early_stopped": bool(stop)}
            if rank == 0:
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(
                    directory))
                if progress_actor is not None:
                    progress_actor.push.remote(metrics)
            else:
                ray.train.report(metrics)
            shutil.rmtree(directory, ignore_errors=True)
            if stop:
                self.model.stop_training = True
            if (fail_after_epoch is not None and not resumed
                    and epoch + 1 == fail_after_epoch):
                raise RuntimeError(f"injected worker failure after epoch {epoch + 1} "
                                   f"(rank {rank} of {world})")

    start_epoch = int(progress["epoch"])
    if start_epoch >= config.epochs or progress.get("early_stopped"):
        return
    model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, initial_epoch=start_epoch,
              callbacks=[*pruning_callbacks(plan), *([average] if average else []),
                         ReportEpoch()], verbose=0)


def recipe_loss(config: TrainConfig, num_classes: int) -> Any:
    """The run's loss: cross-entropy with --label-smoothing, and distillation with --teacher."""
    from jobs.config import DEFAULT_DISTILL_ALPHA, DEFAULT_DISTILL_TEMPERATURE
    from jobs.recipe import Distillation, RecipeLoss

    distillation = None
    if config.teacher is not None:  # TrainConfig set the defaults; mypy cannot know
        distillation = Distillation(
            DEFAULT_DISTILL_ALPHA if config.distill_alpha is None else config.distill_alpha,
            DEFAULT_DISTILL_TEMPERATURE if config.distill_temperature is None
            else config.distill_temperature)
    return RecipeLoss(num_classes, config.label_smoothing, distillation)


# -- the driver side --------------------------------------------------------------------------

def _ray_init(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    # oneDNN kernels, which TensorFlow leaves off on CPUs like this project's (AMD EPYC):
    # training steps run faster with them (jobs.step_timing; figures in docs/training.md).
    # For the job's workers only, not the driver: at batch 1 on one thread (evaluate,
    # serving) they made the float SavedModel slower. It must be in the workers'
    # environment at start: Ray Train imports TensorFlow before the training loop runs.
    runtime_env = {"env_vars": {ONEDNN_ENV: os.environ.get(ONEDNN_ENV, "1")}}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    else:
        # With the dashboard (on 127.0.0.1 only): Ray Train V2's PlacementGroupCleaner asks
        # the state API, which it serves, whether the controller lives; without it the
        # cleaner cannot work and warns every second of the run.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=True, runtime_env=runtime_env)


def _progress_actor_class() -> Any:
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        """Collects the per-epoch metrics rank 0 reports, for the driver's progress display."""

        def __init__(self) -> None:
            self.records: list[dict[str, Any]] = []

        def push(self, record: dict[str, Any]) -> None:
            self.records.append(record)

        def since(self, index: int) -> list[dict[str, Any]]:
            return self.records[index:]

    return ProgressBoard


def run_ray_training(config: TrainConfig,
                     on_epoch: Callable[[dict[str, Any]], None] | None = None,
                     fail_after_epoch: int | None = None) -> Any:
    """Run the TensorflowTrainer; return the Ray Train Result (with the final checkpoint).

    ``fail_after_epoch`` injects a failure: every worker raises after reporting that epoch,
    once (not after the resume) - the fault-tolerance tests' hook, kept out of TrainConfig.
    """
    import threading

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    _ray_init()
    # The CPUs free now, not the cluster's total: Serve replicas or other jobs may hold some,
    # and asking for more than is free would leave the run waiting for them forever.
    available = int(ray.available_resources().get("CPU", 1))
    cpus = config.cpus_per_worker or max(1, available // config.workers)
    config = config.model_copy(update={"cpus_per_worker": cpus})
    resources: dict[str, float] = {"CPU": float(cpus)}
    if config.gpus_per_worker > 0:
        resources["GPU"] = config.gpus_per_worker
    # On the driver's node: the board outlives the loss of any other node (the driver's own
    # loss ends the run anyway), so a lost worker node does not take the progress with it.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    board = _progress_actor_class().options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)).remote()
    storage = config.storage_path or str(Path(os.environ.get("FRAMECAST_HOME", ".framecast"))
                                         .resolve() / "train")
    name = config.run_name or f"{config.model}-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    trainer = TensorflowTrainer(
        train_loop_per_worker=train_loop_per_worker,
        train_loop_config={"config": config.model_dump(), "progress": board,
                           "fail_after_epoch": fail_after_epoch},
        # SPREAD: one worker per node where the nodes allow (best effort, so a one-node
        # cluster still runs them all); losing a node then costs one worker's share.
        scaling_config=ScalingConfig(num_workers=config.workers,
                                     use_gpu=config.gpus_per_worker > 0,
                                     resources_per_worker=resources,
                                     placement_strategy="SPREAD"),
        run_config=RunConfig(
            name=name, storage_path=storage,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # re-raised on the driver thread below
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    seen = 0
    while thread.is_alive():
        thread.join(timeout=1.0)
        records = ray.get(board.since.remote(seen))
        seen += len(records)
        for record in records:
            if on_epoch is not None:
                on_epoch(record)
    for record in ray.get(board.since.remote(seen)):
        if on_epoch is not None:
            on_epoch(record)
    ray.kill(board)
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    if result.checkpoint is None:
        raise TrainingError("training finished without a checkpoint")
    return result


def _init_weights(tf: Any, model: Any, checkpoint_dir: Path) -> None:
    """--init-from: the model's weights (not the optimizer's state) from another run's
    checkpoint. Every weight of the model must be there with the same shape: an OptionError
    names the first one that is not (another --model, width or class count)."""
    path = str(checkpoint_dir / CHECKPOINT_STATE)
    try:
        # expect_partial: the optimizer's slots and weight averages stay behind, unreported.
        status = tf.train.Checkpoint(model=model).read(path).expect_partial()
        status.assert_existing_objects_matched()
    except AssertionError as error:  # a weight of the model that the checkpoint lacks
        raise OptionError(f"--init-from {checkpoint_dir}: its checkpoint does not hold this "
                          f"model's weights ({str(error).splitlines()[0][:200]})") from None
    except ValueError as error:  # a weight of another shape
        raise OptionError(f"--init-from {checkpoint_dir}: its weights do not fit --model "
                          f"{model.name} ({str(error).splitlines()[0][:200]})") from None


def restore_trained_model(config: TrainConfig, checkpoint_dir: Path, input_shape: tuple[int, ...],
                          num_classes: int, steps_per_epoch: int) -> tuple[Any, Any, dict]:
    """(stripped model, pruning plan + layer names, progress) from a Ray Train checkpoint;
    with --ema the model holds the weight averages (pruning masks applied)."""
    from jobs.pruning import pruned_layer_names, strip
    from jobs.recipe import WeightAverage
    from jobs.tf_env import tf

    model, plan = build_training_model(config, input_shape, num_classes,  # type: ignore[arg-type]
                                       steps_per_epoch)
    path = str(checkpoint_dir / CHECKPOINT_STATE)
    average = WeightAverage(model, config.ema) if config.ema > 0 else None
    if average is not None and not any(name.startswith(f"{CHECKPOINT_AVERAGE}/")
                                       for name, _ in tf.train.list_variables(path)):
        raise OptionError(f"--ema {config.ema}: the checkpoint {checkpoint_dir} holds no weight "
                          "averages (its run was trained without --ema)")
    tf.train.Checkpoint(model=model, **({CHECKPOINT_AVERAGE: average.trackable} if average
                                        else {})).read(path).expect_partial()
    if average is not None:
        average.copy_to_model()
    layers = pruned_layer_names(model) if plan.enabled else []
    progress = json.loads((checkpoint_dir / CHECKPOINT_PROGRESS).read_text(encoding="utf-8"))
    return strip(model), (plan, layers), progress


def train_artifact(config: TrainConfig,
                   on_epoch: Callable[[dict[str, Any]], None] | None = None,
                   on_stage: Callable[[str], None] | None = None,
                   fail_after_epoch: int | None = None) -> dict[str, Any]:
    """Train, prune, export and evaluate; write the artifact directory; return its metrics
    (``fail_after_epoch``: see run_ray_training)."""
    validate_config(config)
    if config.init_from is not None:  # a run directory: its last checkpoint, recorded as such
        config = config.model_copy(update={"init_from": str(latest_checkpoint(config.init_from))})
    stage = on_stage or (lambda _message: None)
    from jobs.data import array_sha256, calibration_sample, load_dataset, split_train_val

    data = load_dataset(config.dataset, limit=config.limit, test_limit=config.test_limit,
                        seed=config.seed, input_size=config.input_size)
    if config.teacher is not None and config.from_checkpoint is None:
        check_teacher_fits(config.teacher, data.classes, data.input_shape)
    x_train, y_train, _, _ = split_train_val(data.x_train, data.y_train, config.val_fraction,
                                             config.seed)
    if config.init_from is not None:  # refused here, not in every worker after start-up
        from jobs.tf_env import tf

        candidate, _ = build_training_model(
            config, data.input_shape, len(data.classes),
            _steps_per_epoch(len(y_train), config.batch_size))
        _init_weights(tf, candidate, Path(config.init_from))
        del candidate
    checkpoint_source: Any
    if config.from_checkpoint is not None:
        checkpoint = Path(config.from_checkpoint)
        stage(f"exporting the checkpoint {checkpoint} (no training)")
        started, finished = _checkpoint_times(checkpoint)
        train_seconds = (finished - started).total_seconds()
        checkpoint_source = contextlib.nullcontext(str(checkpoint))
    else:
        started = datetime.now(UTC)
        clock = time.perf_counter()
        stage(f"training {config.model} on {config.dataset} ({len(y_train)} images, "
              f"{config.workers} worker(s))")
        result = run_ray_training(config, on_epoch=on_epoch, fail_after_epoch=fail_after_epoch)
        train_seconds = time.perf_counter() - clock
        finished = datetime.now(UTC)
        checkpoint_source = result.checkpoint.as_directory()
    stage("exporting")
    from jobs.export import convert_tflite, save_float_saved_model
    from jobs.models import ModelSpec, build_model, count_macs
    from jobs.pruning import check_sparsity, measure_sparsity

    steps_per_epoch = _steps_per_epoch(len(y_train), config.batch_size)
    with checkpoint_source as checkpoint_dir:
        model, (plan, layers), progress = restore_trained_model(
            config, Path(checkpoint_dir), data.input_shape, len(data.classes), steps_per_epoch)
    measured, per_layer = measure_sparsity(model, layers)
    check_sparsity(measured, plan)
    quantized_model = model
    if config.qat:
        from jobs.qat import finetune_quantization_aware

        stage(f"quantization-aware fine-tuning ({config.qat_epochs} epoch(s)"
              f"{', sparsity preserved' if plan.enabled else ''})")
        quantized_model, _ = finetune_quantization_aware(
            model, x_train, y_train, epochs=config.qat_epochs, batch_size=config.batch_size,
            learning_rate=config.learning_rate, preserve_sparsity=plan.enabled,
            seed=config.seed)
    macs = count_macs(build_model(ModelSpec(config.model, config.alpha, "none"),
                                  data.input_shape, len(data.classes)))
    target = out_location(config.out)
    out = Path(target) if isinstance(target, str) else None  # None: upload to the object store
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name if out else 'artifact'}-", dir=out.parent
                                    if out is not None and out.parent.exists() else None))
    try:
        save_float_saved_model(model, staging / "saved_model")
        calibration = calibration_sample(x_train, CALIBRATION_SAMPLES, config.seed)
        calibration_hash = None
        if config.quantize != "none":
            tflite = convert_tflite(quantized_model, config.quantize, calibration)
            (staging / "model.tflite").write_bytes(tflite)
            if config.quantize == "int8":
                calibration_hash = array_sha256(calibration)
        manifest = _manifest(config, data, model, macs, plan, measured, per_layer,
                             calibration_hash, min(len(calibration), CALIBRATION_SAMPLES)
                             if calibration_hash else None,
                             started, finished, train_seconds, progress)
        stage("evaluating on the test split")
        metrics = _evaluate_staged(staging, manifest, config)
        metrics["train_seconds"] = train_seconds
        _finish_artifact(staging, manifest, metrics)
        if out is None:  # exported here, then uploaded (the manifest last)
            from serving.storage import upload

            stage(f"uploading to {target}")
            upload(staging, config.out, storage_settings())
        else:
            if out.exists():
                shutil.rmtree(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return metrics


def _checkpoint_times(checkpoint: Path) -> tuple[datetime, datetime]:
    """(run start, checkpoint time) of a checkpoint of an earlier run.

    The start comes from the run directory's name (``<model>-YYYYmmddTHHMMSS``, as
    run_ray_training names it), the end from when the checkpoint's progress was written.
    """
    finished = datetime.fromtimestamp((checkpoint / CHECKPOINT_PROGRESS).stat().st_mtime, UTC)
    stamp = checkpoint.resolve().parent.name.rsplit("-", 1)[-1]
    try:
        started = datetime.strptime(stamp, "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        started = finished
    return min(started, finished), finished


def _manifest(config: TrainConfig, data: Any, model: Any, macs: int, plan: Any, measured: float,
              per_layer: dict[str, float], calibration_hash: str | None,
              calibration_count: int | None, started: datetime, finished: datetime,
              train_seconds: float, progress: dict[str, Any]) -> Any:
    from serving.artifacts import ArtifactManifest, InputSpec, Optimization, Training

    height, width, channels = data.input_shape
    quantized = config.quantize != "none"
    input_dtype = "int8" if config.quantize == "int8" else "float32"
    return ArtifactManifest(
        name=f"{config.dataset.split(':')[0]}-{config.model}",
        version=finished.strftime("%Y%m%d%H%M%S"),
        model=config.model,
        classes=list(data.classes),
        input=InputSpec(shape=[-1, height, width, channels], dtype=input_dtype,
                        normalization="x / 255 (uint8 pixels to [0, 1])"),
        primary="model.tflite" if quantized else "saved_model",
        param_count=int(model.count_params()),
        macs=macs,
        optimization=Optimization(
            prune_schedule=config.prune,
            target_sparsity=plan.effective_target,
            measured_sparsity=measured, layer_sparsity=per_layer,
            quantization=config.quantize,
            qat=config.qat, qat_epochs=config.qat_epochs if config.qat else None,
            calibration_sha256=calibration_hash,
            calibration_samples=calibration_count),
        training=Training(
            dataset=config.dataset, epochs=int(progress["epoch"]),
            epochs_requested=config.epochs, workers=config.workers,
            gpus_per_worker=config.gpus_per_worker, seed=config.seed, limit=config.limit,
            started_at=started, finished_at=finished, train_seconds=train_seconds,
            early_stopped=bool(progress.get("early_stopped")),
            resumed_from_epoch=progress.get("resumed_from"),
            onednn=progress.get("onednn"),
            recipe=recipe_record(config),
            history=progress.get("history", [])),
    )


def _evaluate_staged(staging: Path, manifest: Any, config: TrainConfig) -> dict[str, Any]:
    from serving.artifacts import load_artifact, write_manifest

    write_manifest(staging, manifest)
    artifact = load_artifact(staging)
    if artifact.tflite_path is not None:
        runner_info = _tflite_io(artifact.tflite_path)
        manifest.input.dtype = runner_info["dtype"]
        manifest.input.scale = runner_info["scale"]
        manifest.input.zero_point = runner_info["zero_point"]
    metrics = _evaluate_in_fresh_process(staging, config, "auto")
    if artifact.tflite_path is not None:
        float_metrics = _evaluate_in_fresh_process(staging, config, "saved_model")
        metrics["float"] = {k: v for k, v in float_metrics.items() if k != "confusion_matrix"}
    return metrics


def _evaluate_in_fresh_process(directory: Path, config: TrainConfig,
                               runtime: str) -> dict[str, Any]:
    """Evaluate in a new Python process, so TensorFlow's thread setting (1) really applies."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "jobs.evaluate", str(directory), "--runtime", runtime]
    if config.test_limit is not None:
        command += ["--limit", str(config.test_limit)]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode != 0:
        raise TrainingError(f"evaluation of {directory} ({runtime}) failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _tflite_io(path: Path) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter

    details = Interpreter(model_path=str(path)).get_input_details()[0]
    scale, zero = details["quantization"]
    dtype = str(details["dtype"].__name__)
    return {"dtype": dtype, "scale": float(scale) if scale else None,
            "zero_point": int(zero) if scale else None}


def _finish_artifact(staging: Path, manifest: Any, metrics: dict[str, Any]) -> None:
    from serving.artifacts import write_json, write_manifest

    write_json(staging / "metrics.json", metrics)
    summary = {k: v for k, v in metrics.items() if k not in ("confusion_matrix",)}
    write_manifest(staging, manifest.model_copy(update={"metrics": summary}))


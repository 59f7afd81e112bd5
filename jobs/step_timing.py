"""Time one training step of a model under each ingredient of ``framecast train``.

``python -m jobs.step_timing [--model optimized_cnn] [--steps 60]`` fits the model on the
first ``steps`` batches of 128 Fashion-MNIST images, once per variant (plain; +augmentation;
+pruning; +TensorFlow's oneDNN kernels; +MultiWorkerMirroredStrategy with one worker), each
in a fresh process so the strategies and kernel choices do not meet, and prints milliseconds
per step of the last of three epochs. It is how docs/results.md found what made Ray Train
epochs slow; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess  # nosec B404 - runs this module itself with fixed arguments
import sys
import time
from typing import Any

from jobs.train import ONEDNN_ENV, _steps_per_epoch

VARIANTS = ("plain", "augment", "augment+prune", "augment+prune+onednn", "augment+prune+mwms")


def time_variant(variant: str, model_name: str, steps: int, batch: int = 128) -> float:
    """Milliseconds per step of the last of three epochs of ``variant``."""
    from jobs.data import NO_AUGMENTATION, Augmentation, load_dataset, make_tf_dataset
    from jobs.models import ModelSpec, build_model
    from jobs.pruning import apply_pruning, plan_pruning, pruning_callbacks
    from jobs.tf_env import keras, tf

    tf.config.threading.set_intra_op_parallelism_threads(2)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    data = load_dataset("fashion-mnist", limit=batch * steps, test_limit=1, seed=0)
    aug = Augmentation() if "augment" in variant else NO_AUGMENTATION
    dataset = make_tf_dataset(data.x_train, data.y_train, batch, training=True, seed=0, aug=aug)
    strategy = (
        tf.distribute.MultiWorkerMirroredStrategy()
        if "mwms" in variant
        else tf.distribute.get_strategy()
    )
    with strategy.scope():
        plan = plan_pruning("polynomial" if "prune" in variant else "none", 0.5, steps, 15)
        model = apply_pruning(build_model(ModelSpec(model_name), data.input_shape, 10), plan)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )

    class EpochTimer(keras.callbacks.Callback):
        seconds = 0.0

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.seconds = time.perf_counter() - self.started

    timer = EpochTimer()
    model.fit(dataset, epochs=3, callbacks=[*pruning_callbacks(plan), timer], verbose=0)
    return 1000.0 * timer.seconds / _steps_per_epoch(len(data.y_train), batch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="optimized_cnn")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--variant", choices=VARIANTS, help="time only this one, in-process")
    args = parser.parse_args(argv)
    if args.variant:
        # Read when TensorFlow loads, which time_variant does.
        os.environ[ONEDNN_ENV] = "1" if "onednn" in args.variant else "0"
        ms = time_variant(args.variant, args.model, args.steps)
        print(
            json.dumps({"variant": args.variant, "model": args.model, "ms_per_step": round(ms, 1)}),
            flush=True,
        )
        return
    for variant in VARIANTS:
        subprocess.run(  # nosec B603 - this interpreter and module, fixed arguments
            [
                sys.executable,
                "-m",
                "jobs.step_timing",
                "--model",
                args.model,
                "--steps",
                str(args.steps),
                "--variant",
                variant,
            ],
            check=True,
        )


if __name__ == "__main__":
    main()

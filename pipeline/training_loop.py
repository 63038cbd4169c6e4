"""The one training function, shared by the `train` stage, the `tune` stage and the benchmarks.

`fit` compiles nothing and tracks nothing: the optimiser comes from `compile_model`, and MLflow,
Optuna and checkpoints plug in as Keras callbacks.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from pipeline.config import AugmentParams, Params, TrainParams
from pipeline.errors import PipelineError
from pipeline.model import NUM_CLASSES, with_precision
from pipeline.splits import Split
from pipeline.stage_runner import stop_point

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 500  # validation/prediction batch: larger is faster and changes no result
INPUT_THREADS = 2  # batches gathered (and augmented) at once by tf.data
PREFETCH_BATCHES = 2  # batches ready ahead of the training step
HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")

History = dict[str, list[float]]


class TrainingDiverged(PipelineError):
    """The loss became NaN or infinite; the model is not worth keeping."""


@keras.saving.register_keras_serializable(package="pipeline")
class LearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """The learning rate at each optimiser step, by `train.schedule`.

    - time_decay: peak / (1 + decay * step), Keras 2's SGD(decay=...) (Keras 3 ignores `decay`).
    - step: peak * step_factor ** (completed epochs // step_epochs).
    - cosine: a linear warm-up to peak over `warmup_steps`, then half a cosine down to 0.
    - one_cycle: a linear warm-up to peak over `warmup_steps`, then a straight line down to 0.
    """

    def __init__(
        self,
        schedule: str,
        peak: float,
        steps_per_epoch: int,
        total_steps: int,
        decay: float = 0.0,
        step_epochs: int = 1,
        step_factor: float = 1.0,
        warmup_steps: int = 0,
    ) -> None:
        self.schedule, self.peak = schedule, peak
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.decay, self.step_epochs, self.step_factor = decay, step_epochs, step_factor
        self.warmup_steps = warmup_steps

    def __call__(self, step: Any) -> Any:
        step = ops.cast(step, "float32")
        if self.schedule == "time_decay":
            return self.peak / (1.0 + self.decay * step)
        if self.schedule == "step":
            drops = ops.floor(step / float(self.step_epochs * self.steps_per_epoch))
            return self.peak * ops.power(self.step_factor, drops)
        warmup = float(max(self.warmup_steps, 1))
        rising = self.peak * ops.minimum((step + 1.0) / warmup, 1.0)
        span = float(max(self.total_steps - self.warmup_steps, 1))
        progress = ops.clip((step - float(self.warmup_steps)) / span, 0.0, 1.0)
        if self.schedule == "cosine":
            falling = self.peak * 0.5 * (1.0 + ops.cos(math.pi * progress))
        else:  # one_cycle
            falling = self.peak * (1.0 - progress)
        return ops.where(step < float(self.warmup_steps), rising, falling)

    def get_config(self) -> dict[str, Any]:
        return {
            "schedule": self.schedule,
            "peak": self.peak,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "decay": self.decay,
            "step_epochs": self.step_epochs,
            "step_factor": self.step_factor,
            "warmup_steps": self.warmup_steps,
        }


def steps_per_epoch(train_images: int, params: TrainParams) -> int:
    """Optimiser steps in one epoch over `train_images` (the last batch may be smaller)."""
    return math.ceil(train_images / params.batch_size)


def learning_rate(params: TrainParams, steps: int) -> LearningRate:
    """The schedule of `params` for an epoch of `steps` optimiser steps."""
    return LearningRate(
        params.schedule,
        params.peak_learning_rate,
        steps_per_epoch=steps,
        total_steps=params.epochs * steps,
        decay=params.decay,
        step_epochs=params.step_epochs,
        step_factor=params.step_factor,
        warmup_steps=round(params.warmup_epochs * steps),
    )


def make_optimizer(params: TrainParams, steps: int) -> keras.optimizers.Optimizer:
    """SGD with (Nesterov) momentum and the schedule. Keras applies weight decay decoupled from
    the gradient: w -= lr * weight_decay * w each step, as an L2 penalty of weight_decay / 2
    would in plain SGD."""
    return keras.optimizers.SGD(
        learning_rate=learning_rate(params, steps),
        momentum=params.momentum,
        nesterov=params.nesterov,
        weight_decay=params.weight_decay or None,
    )


def one_hot_labels(params: TrainParams) -> bool:
    """Label smoothing needs one-hot targets; without it, integer labels as the seed used."""
    return params.label_smoothing > 0


def make_loss(params: TrainParams) -> keras.losses.Loss:
    if one_hot_labels(params):
        return keras.losses.CategoricalCrossentropy(label_smoothing=params.label_smoothing)
    return keras.losses.SparseCategoricalCrossentropy()


def compile_model(model: keras.Model, params: TrainParams, steps: int) -> None:
    """SGD with the learning-rate schedule for epochs of `steps` steps; cross-entropy, smoothed
    when train.label_smoothing > 0; accuracy."""
    model.compile(optimizer=make_optimizer(params, steps), loss=make_loss(params),
                  metrics=["accuracy"])  # fmt: skip


def prepared_model(
    make: Callable[[], keras.Model], params: Params, train_images: int
) -> keras.Model:
    """The one set-up before training, for the train stage and sweep trials alike: seeds
    everything, then makes the network inside the distribution strategy's scope and, unless it
    comes compiled (a checkpoint, with its optimiser's state), sets it to train.precision and
    compiles it for epochs of `train_images` images."""
    seed_everything(params.train)
    with distribution_strategy(params.train).scope():
        model = make()
        if not model.compiled:
            model = with_precision(model, params.model, params.train.precision)
            compile_model(model, params.train, steps_per_epoch(train_images, params.train))
    return model


def seed_everything(params: TrainParams) -> None:
    """Seeds Python, NumPy and TensorFlow; with `deterministic`, also TF's op determinism."""
    keras.utils.set_random_seed(params.seed)
    if params.deterministic:
        tf.config.experimental.enable_op_determinism()


def distribution_strategy(params: TrainParams) -> tf.distribute.Strategy:
    """`mirrored`: one replica per GPU (per logical CPU device if there is no GPU).

    Build and compile the model inside `strategy.scope()`. `batch_size` is the global batch:
    each of N replicas gets batch_size / N images per step.
    """
    if params.distribute == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        strategy = tf.distribute.MirroredStrategy(devices=[device.name for device in devices])
        log.info("MirroredStrategy over %d replicas", strategy.num_replicas_in_sync)
        return strategy
    return tf.distribute.get_strategy()  # the default: no distribution


# --- input ----------------------------------------------------------------------------------------


def input_pipeline(
    split: Split,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    augment: AugmentParams | None = None,
    one_hot: bool = False,
) -> tf.data.Dataset:
    """Batches of (uint8 images, labels) through tf.data; labels one-hot when `one_hot`.

    Shuffling permutes indices, not images (a 45,000-image shuffle buffer would copy 135 MB per
    epoch), and batches are gathered from one in-memory copy. Reshuffled every epoch, from
    `shuffle_seed`.
    """
    images = tf.constant(split.images)
    labels = tf.constant(split.labels.astype(np.int32))
    if one_hot:
        labels = tf.one_hot(labels, NUM_CLASSES)
    indices = tf.data.Dataset.range(len(split))
    if shuffle_seed is not None:
        indices = indices.shuffle(len(split), seed=shuffle_seed, reshuffle_each_iteration=True)
    batches = indices.batch(batch_size).map(
        lambda idx: (tf.gather(images, idx), tf.gather(labels, idx)),
        num_parallel_calls=INPUT_THREADS,
    )
    if augment is not None and augments(augment):
        rng = tf.random.Generator.from_seed(0 if shuffle_seed is None else shuffle_seed)
        batches = batches.map(
            lambda x, y: (augment_batch(x, augment, rng), y), num_parallel_calls=INPUT_THREADS
        )
    # tf.data's autotuner left some epochs idle for seconds before their first batch (up to
    # 10 s per 26 s epoch on two cores, measured); gathering and augmenting a batch takes
    # milliseconds, so fixed, small parallelism and prefetching serve as well, with no stall.
    options = tf.data.Options()
    options.autotune.enabled = False
    return batches.prefetch(PREFETCH_BATCHES).with_options(options)


def augments(augment: AugmentParams) -> bool:
    return augment.flip or augment.translate > 0 or augment.cutout > 0


def augment_batch(images: tf.Tensor, augment: AugmentParams, rng: tf.random.Generator) -> tf.Tensor:
    """Random horizontal flips, shifts (zero-padded) and cutout of a uint8 batch, image by image.

    Cutout blanks a square of `cutout` pixels a side, centred anywhere in the image (so it may
    be cut off at the border), to zero.
    """
    size = images.shape[1]
    batch = tf.shape(images)[0]
    if augment.flip:
        flip = rng.uniform([batch, 1, 1, 1]) < 0.5
        images = tf.where(flip, tf.reverse(images, axis=[2]), images)
    pad = round(augment.translate * size)
    if pad > 0:
        padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        offsets = rng.uniform([batch, 2], 0, 2 * pad + 1, dtype=tf.int32)
        rows = offsets[:, :1] + tf.range(size)[None, :]  # (batch, size)
        cols = offsets[:, 1:] + tf.range(size)[None, :]
        images = tf.gather(padded, rows, axis=1, batch_dims=1)
        images = tf.gather(images, cols, axis=2, batch_dims=1)
    if augment.cutout > 0:
        corners = rng.uniform([batch, 2], 0, size, dtype=tf.int32) - augment.cutout // 2
        inside_rows = tf.range(size)[None, :] - corners[:, :1]  # (batch, size)
        inside_cols = tf.range(size)[None, :] - corners[:, 1:]
        row_hit = (inside_rows >= 0) & (inside_rows < augment.cutout)
        col_hit = (inside_cols >= 0) & (inside_cols < augment.cutout)
        square = row_hit[:, :, None, None] & col_hit[:, None, :, None]  # (batch, size, size, 1)
        images = tf.where(square, tf.zeros_like(images), images)
    return images


# --- callbacks ------------------------------------------------------------------------------------


class EpochRecorder(keras.callbacks.Callback):
    """Adds the learning rate to each epoch's logs, stops on a non-finite loss, keeps history.

    It runs first among the callbacks, so the others (MLflow, Optuna, checkpoints) see the
    learning rate and never see a diverged epoch.
    """

    def __init__(self, history: History | None = None) -> None:
        super().__init__()
        self.history: History = {key: list(values) for key, values in (history or {}).items()}
        self.diverged: str | None = None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is None:
            return
        logs["learning_rate"] = float(self.model.optimizer.learning_rate)
        loss = float(logs.get("loss", math.nan))
        if not math.isfinite(loss):
            self.diverged = (
                f"the training loss became {loss} in epoch {epoch + 1} (learning rate "
                f"{logs['learning_rate']:.3g}); lower train.learning_rate"
            )
            self.model.stop_training = True
            logs.clear()  # later callbacks must not record or checkpoint this epoch
            return
        for key in HISTORY_KEYS:
            self.history.setdefault(key, []).append(float(logs[key]))


class StopWhenAsked(keras.callbacks.Callback):
    """Takes a stop asked for by Ctrl-C or SIGTERM (see stage_runner.stop_point) between two
    batches, where no MLflow write or checkpoint is under way."""

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        stop_point()


class BestWeights(keras.callbacks.Callback):
    """Keeps a copy of the weights of the epoch with the best validation accuracy so far."""

    def __init__(self, value: float = -math.inf, weights: list[np.ndarray] | None = None) -> None:
        super().__init__()
        self.value, self.weights = value, weights
        self.epoch: int | None = None
        self.improved = False  # in the epoch just ended; read by the checkpoint callback

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.improved = bool(logs) and float(logs["val_accuracy"]) > self.value  # type: ignore[index]
        if self.improved:
            self.value = float(logs["val_accuracy"])  # type: ignore[index]
            self.weights = self.model.get_weights()
            self.epoch = epoch + 1


def fit(
    model: keras.Model,
    train: Split,
    validation: Split,
    params: TrainParams,
    *,
    initial_epoch: int = 0,
    history: History | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    best: BestWeights | None = None,
    verbose: int = 1 if sys.stdout.isatty() else 2,
) -> History:
    """Trains a compiled model from `initial_epoch` to `params.epochs`; returns the full history.

    `history` holds the epochs before `initial_epoch` (a resumed run). With
    `params.restore_best`, the model ends with the weights of its best epoch by validation
    accuracy (`best` carries that over a resume). Raises TrainingDiverged when the loss turns
    NaN or infinite, and KeyboardInterrupt at the batch after Ctrl-C or SIGTERM.
    """
    # Each epoch's shuffle order depends on the seed and where training (re)starts.
    one_hot = one_hot_labels(params)
    train_data = input_pipeline(
        train,
        params.batch_size,
        shuffle_seed=params.seed + initial_epoch,
        augment=params.augment,
        one_hot=one_hot,
    )
    validation_data = input_pipeline(validation, EVAL_BATCH_SIZE, one_hot=one_hot)
    recorder = EpochRecorder(history)
    best = best or BestWeights()
    model.fit(
        train_data,
        validation_data=validation_data,
        epochs=params.epochs,
        initial_epoch=initial_epoch,
        callbacks=[recorder, best, *callbacks, StopWhenAsked()],
        shuffle=False,  # the input pipeline shuffles
        verbose=verbose,
    )
    if recorder.diverged:
        raise TrainingDiverged(recorder.diverged)
    if params.restore_best and best.weights is not None:
        model.set_weights(best.weights)
    return recorder.history

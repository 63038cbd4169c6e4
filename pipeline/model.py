"""The classic Keras CIFAR-10 CNN, built from the `model` params.

It takes raw uint8 images (32, 32, 3) and scales them to [0, 1] itself, so a served model is
sent pixels as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

import keras

from pipeline.config import ModelParams
from pipeline.errors import PipelineError

INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 10


def build_model(params: ModelParams) -> keras.Model:
    """Conv-Conv-MaxPool-Dropout per block, then Dense, Dropout and a 10-way softmax.

    With conv_filters [32, 64] and dense_units 512: 1,250,858 parameters. The first conv of each
    block pads ('same') and the second does not ('valid'), as in the original example.
    """
    keras.utils.set_random_seed(params.init_seed)  # the initial weights
    inputs = keras.Input(shape=INPUT_SHAPE, dtype="uint8", name="pixels")
    x = keras.layers.Rescaling(1.0 / 255, name="scale")(inputs)
    for block, filters in enumerate(params.conv_filters, start=1):
        x = keras.layers.Conv2D(
            filters, 3, padding="same", activation="relu", name=f"conv{block}a"
        )(x)
        x = keras.layers.Conv2D(filters, 3, activation="relu", name=f"conv{block}b")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{block}")(x)
        x = keras.layers.Dropout(params.conv_dropout, name=f"dropout{block}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(params.dense_units, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(params.dense_dropout, name="dropout_dense")(x)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="cifar10_cnn")


def summary_text(model: keras.Model) -> str:
    """The layer-by-layer summary with parameter counts, as plain text.

    Written by hand rather than with model.summary(), whose table is cut to the terminal's width.
    """
    rows = [("Layer (type)", "Output shape", "Param #")]
    for layer in model.layers:
        shape = str(tuple(layer.output.shape))
        rows.append((f"{layer.name} ({type(layer).__name__})", shape, f"{layer.count_params():,}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    rule = "-" * (sum(widths) + 4)
    lines = [f'Model: "{model.name}"', rule]
    for index, (name, shape, count) in enumerate(rows):
        lines.append(f"{name:<{widths[0]}}  {shape:<{widths[1]}}  {count:>{widths[2]}}")
        if index == 0:
            lines.append(rule)
    trainable = sum(int(w.numpy().size) for w in model.trainable_weights)
    lines += [
        rule,
        f"Total params: {model.count_params():,}",
        f"Trainable params: {trainable:,}",
        f"Non-trainable params: {model.count_params() - trainable:,}",
    ]
    return "\n".join(lines) + "\n"


def save_model(model: keras.Model, path: Path) -> None:
    """Saves beside `path`, then renames: a half-written model never takes its place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.keras")  # Keras wants the suffix
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_model(path: Path) -> keras.Model:
    if not path.is_file():
        raise PipelineError(f"{path}: missing; run `dvc repro` to build and train it")
    return keras.saving.load_model(path)

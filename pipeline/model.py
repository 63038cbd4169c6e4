"""The classic Keras CIFAR-10 CNN, built from the `model` params.

It takes raw uint8 images (32, 32, 3) and scales them itself (to [0, 1] or [-1, 1], as
`model.pixel_scale` says), so a served model is sent pixels as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras

from pipeline.atomic import replacing
from pipeline.config import ModelParams
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

INPUT_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
# model.pixel_scale: (scale, offset) from raw pixels 0..255. `unit` is the seed's x / 255 in
# [0, 1]; `symmetric` centres the inputs on zero, in [-1, 1], so the first layer's gradients do
# not all share one sign and SGD converges in far fewer epochs.
PIXEL_SCALES = {"unit": (1.0 / 255, 0.0), "symmetric": (1.0 / 127.5, -1.0)}


def build_model(params: ModelParams, precision: str = "float32") -> keras.Model:
    """Conv-Conv-MaxPool-Dropout per block, then Dense, Dropout and a 10-way softmax.

    With conv_filters [32, 64] and dense_units 512: 1,250,858 parameters. The first conv of each
    block pads ('same') and the second does not ('valid'), as in the original example. The
    initial weights come from `params.init_seed`: the ReLU layers' kernels from
    `params.kernel_initializer` (the seed's glorot_uniform, or He's, scaled for ReLU), the
    softmax layer's always from glorot_uniform.
    """
    keras.utils.set_random_seed(params.init_seed)  # the initial weights
    return network(params, precision)


def network(params: ModelParams, precision: str = "float32") -> keras.Model:
    """The layers of `build_model`, with fresh weights from the current random state.

    `precision` is a Keras dtype policy: `mixed_bfloat16` computes in bfloat16 and keeps float32
    weights. The softmax always computes in float32, where bfloat16's 8-bit mantissa would
    round the probabilities.
    """
    policy = {"dtype": precision}
    relu = {"activation": "relu", "kernel_initializer": params.kernel_initializer, **policy}
    inputs = keras.Input(shape=INPUT_SHAPE, dtype="uint8", name="pixels")
    scale, offset = PIXEL_SCALES[params.pixel_scale]
    x = keras.layers.Rescaling(scale, offset=offset, name="scale", **policy)(inputs)
    for block, filters in enumerate(params.conv_filters, start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", name=f"conv{block}a", **relu)(x)
        x = keras.layers.Conv2D(filters, 3, name=f"conv{block}b", **relu)(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{block}", **policy)(x)
        x = keras.layers.Dropout(params.conv_dropout, name=f"dropout{block}", **policy)(x)
    x = keras.layers.Flatten(name="flatten", **policy)(x)
    x = keras.layers.Dense(params.dense_units, name="dense", **relu)(x)
    x = keras.layers.Dropout(params.dense_dropout, name="dropout_dense", **policy)(x)
    outputs = keras.layers.Dense(
        NUM_CLASSES, activation="softmax", name="probabilities", dtype="float32"
    )(x)
    return keras.Model(inputs, outputs, name="cifar10_cnn")


def with_precision(model: keras.Model, params: ModelParams, precision: str) -> keras.Model:
    """The same network with the same weights, computing in `precision`.

    Weights stay float32 under every policy, so they copy across exactly. Returns `model` itself
    when it already computes in `precision`.
    """
    if model.get_layer("scale").dtype_policy.name == precision:
        return model
    if precision == "mixed_bfloat16" and not native_bfloat16():
        log.warning(
            "this CPU has no bfloat16 instructions (avx512_bf16 or amx_bf16) and no GPU is "
            "visible: bfloat16 is emulated, about 8x slower than float32 on an AVX2-only AMD "
            "EPYC; set train.precision: float32 (`dvc exp run -S train.precision=float32`)"
        )
    copy = network(params, precision)
    copy.set_weights(model.get_weights())
    return copy


def native_bfloat16() -> bool:
    """Whether bfloat16 runs in hardware here: a GPU, or a CPU with AVX-512 BF16 or AMX. Where
    the CPU's flags cannot be read (not Linux), it is assumed to."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def portable(model: keras.Model, params: ModelParams) -> keras.Model:
    """A float32 copy of the trained network, without optimiser state: what evaluate and serving
    load, on any machine, with no project code needed to deserialise a learning-rate schedule."""
    copy = network(params, "float32")
    copy.set_weights(model.get_weights())
    return copy


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
    with replacing(path) as tmp:
        model.save(tmp)


def load_model(path: Path) -> keras.Model:
    if not path.is_file():
        raise PipelineError(f"{path}: missing; run `dvc repro` to build and train it")
    return keras.saving.load_model(path)

"""The model, the optimiser's time decay, the input pipeline and the shared fit function."""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np
import pytest

from pipeline.config import AugmentParams, params_from_dict
from pipeline.dataset import Split
from pipeline.model import build_model, summary_text
from pipeline.training import (
    TrainingDiverged,
    augment_batch,
    compile_model,
    fit,
    input_pipeline,
    seed_everything,
)
from tests.conftest import make_tiny_cifar


@pytest.fixture(scope="module")
def tiny_splits() -> tuple[Split, Split]:
    tiny = make_tiny_cifar(per_class=4)
    images = np.concatenate(
        [p.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) for p, _ in tiny.train_batches]
    )
    labels = tiny.train_labels.astype(np.uint8)
    return Split(images[:160], labels[:160]), Split(images[160:], labels[160:])


def small(params_dict: dict[str, Any], **train: Any) -> Any:
    params_dict["model"].update(conv_filters=[4, 8], dense_units=16)
    params_dict["train"].update({"epochs": 2, "batch_size": 16, **train})
    return params_from_dict(params_dict)


def test_the_seed_network_has_1_250_858_parameters_and_takes_raw_pixels(
    params_dict: dict[str, Any],
) -> None:
    model = build_model(params_from_dict(params_dict).model)
    assert model.count_params() == 1_250_858
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == 1_250_858
    counts = [layer.count_params() for layer in model.layers if layer.count_params()]
    assert counts == [896, 9_248, 18_496, 36_928, 1_180_160, 5_130]
    assert model.input.dtype == "uint8"
    assert [layer.padding for layer in model.layers if isinstance(layer, keras.layers.Conv2D)] == [
        "same", "valid", "same", "valid",
    ]  # fmt: skip
    dropouts = [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    assert dropouts == [0.25, 0.25, 0.5]
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    probabilities = model.predict(pixels, verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    scale = model.get_layer("scale")  # the model scales raw pixels to [0, 1] itself
    assert isinstance(scale, keras.layers.Rescaling) and scale.scale == pytest.approx(1 / 255)
    assert "Total params: 1,250,858" in summary_text(model)
    assert "conv1a (Conv2D)" in summary_text(model)


def test_the_learning_rate_after_k_steps_follows_the_time_decay_formula(
    params_dict: dict[str, Any], tiny_splits: tuple[Split, Split]
) -> None:
    params = small(params_dict, learning_rate=0.05, decay=0.1)  # large decay: easy to see
    model = build_model(params.model)
    compile_model(model, params.train)
    train, _ = tiny_splits
    for _ in range(7):
        model.train_on_batch(train.images[:16], train.labels[:16])
    optimizer = model.optimizer
    assert int(optimizer.iterations) == 7
    assert float(optimizer.learning_rate) == pytest.approx(0.05 / (1 + 0.1 * 7), rel=1e-6)
    assert optimizer.momentum == pytest.approx(0.9) and optimizer.nesterov


def test_fit_records_every_epoch_with_the_learning_rate(
    params_dict: dict[str, Any], tiny_splits: tuple[Split, Split]
) -> None:
    params = small(params_dict, epochs=3)
    seed_everything(params.train)
    model = build_model(params.model)
    compile_model(model, params.train)
    history = fit(model, *tiny_splits, params.train, verbose=0)
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"}
    assert all(len(values) == 3 for values in history.values())
    steps_per_epoch = 10  # 160 images / batch 16
    expected_lr = [0.01 / (1 + 1e-6 * steps_per_epoch * epoch) for epoch in (1, 2, 3)]
    np.testing.assert_allclose(history["learning_rate"], expected_lr, rtol=1e-6)


def test_same_seed_with_determinism_gives_the_same_metrics(
    params_dict: dict[str, Any], tiny_splits: tuple[Split, Split]
) -> None:
    params = small(params_dict, deterministic=True)

    def train_once() -> dict[str, list[float]]:
        seed_everything(params.train)
        model = build_model(params.model)
        compile_model(model, params.train)
        return fit(model, *tiny_splits, params.train, verbose=0)

    assert train_once() == train_once()


def test_a_nan_loss_stops_training_with_a_clear_error(
    params_dict: dict[str, Any], tiny_splits: tuple[Split, Split]
) -> None:
    params = small(params_dict, learning_rate=1e9, epochs=5)
    seed_everything(params.train)
    model = build_model(params.model)
    compile_model(model, params.train)
    with pytest.raises(TrainingDiverged, match=r"the training loss became (nan|inf) in epoch 1"):
        fit(model, *tiny_splits, params.train, verbose=0)


def test_the_input_pipeline_shuffles_by_seed_and_keeps_pixels_uint8(
    tiny_splits: tuple[Split, Split],
) -> None:
    train, _ = tiny_splits

    def first_epoch_labels(seed: int | None) -> list[int]:
        return [
            int(y) for _, labels in input_pipeline(train, 32, shuffle_seed=seed) for y in labels
        ]

    assert first_epoch_labels(None) == train.labels.tolist()
    assert first_epoch_labels(1) == first_epoch_labels(1) != first_epoch_labels(2)
    assert sorted(first_epoch_labels(1)) == sorted(train.labels.tolist())
    images, _ = next(iter(input_pipeline(train, 8, shuffle_seed=1)))
    assert images.dtype == "uint8" and tuple(images.shape) == (8, 32, 32, 3)


def test_augmentation_flips_and_shifts_each_image(tiny_splits: tuple[Split, Split]) -> None:
    import tensorflow as tf

    images = tf.constant(tiny_splits[0].images[:64])
    flipped = augment_batch(
        images, AugmentParams(flip=True, translate=0.0), tf.random.Generator.from_seed(0)
    ).numpy()
    original = images.numpy()
    is_flipped = [np.array_equal(f, o[:, ::-1]) for f, o in zip(flipped, original, strict=True)]
    is_same = [np.array_equal(f, o) for f, o in zip(flipped, original, strict=True)]
    assert all(a or b for a, b in zip(is_flipped, is_same, strict=True))
    assert 10 < sum(is_flipped) < 54  # about half, image by image

    shifted = augment_batch(
        images, AugmentParams(flip=False, translate=0.125), tf.random.Generator.from_seed(0)
    ).numpy()
    assert shifted.dtype == np.uint8 and shifted.shape == original.shape
    for out, src in zip(shifted[:16], original[:16], strict=True):
        # Each output is the source moved by at most 4 pixels each way, zero-padded.
        padded = np.pad(src, ((4, 4), (4, 4), (0, 0)))
        assert any(
            np.array_equal(out, padded[r : r + 32, c : c + 32]) for r in range(9) for c in range(9)
        )
    assert not np.array_equal(shifted, original)


def test_the_seed_configuration_has_no_augmentation(params_dict: dict[str, Any]) -> None:
    augment = params_from_dict(params_dict).train.augment
    assert augment == AugmentParams(flip=False, translate=0.0)
    assert dataclasses.is_dataclass(augment)


@pytest.mark.parametrize("restore_best", [True, False])
def test_the_model_keeps_its_best_or_its_last_epoch(
    params_dict: dict[str, Any], tiny_splits: tuple[Split, Split], restore_best: bool
) -> None:
    params = small(params_dict, epochs=6, learning_rate=0.05, restore_best=restore_best)
    seed_everything(params.train)
    model = build_model(params.model)
    compile_model(model, params.train)
    history = fit(model, *tiny_splits, params.train, verbose=0)
    _, validation = tiny_splits
    accuracy = float(
        np.mean(model.predict(validation.images, verbose=0).argmax(axis=1) == validation.labels)
    )
    expected = max(history["val_accuracy"]) if restore_best else history["val_accuracy"][-1]
    assert accuracy == pytest.approx(expected, abs=1e-6)

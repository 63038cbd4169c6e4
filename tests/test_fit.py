"""The model, the optimiser's time decay, the input pipeline and the shared fit function."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import pytest

from pipeline.config import AugmentParams, params_from_dict, set_dotted
from pipeline.model import build_model, summary_text
from pipeline.params_edit import load_recipe
from pipeline.splits import Split
from pipeline.training_loop import (
    TrainingDiverged,
    augment_batch,
    compile_model,
    fit,
    input_pipeline,
    prepared_model,
    seed_everything,
    steps_per_epoch,
)
from tests.helpers import ROOT, make_tiny_cifar


@pytest.fixture(scope="module")
def tiny_splits() -> tuple[Split, Split]:
    tiny = make_tiny_cifar(per_class=4)
    images = np.concatenate(
        [p.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) for p, _ in tiny.train_batches]
    )
    labels = tiny.train_labels.astype(np.uint8)
    return Split(images[:160], labels[:160]), Split(images[160:], labels[160:])


def seed_params(params_dict: dict[str, Any]) -> dict[str, Any]:
    """The real params.yaml with the seed's recipe applied: the tests' known starting point."""
    for key, value in load_recipe(str(ROOT / "recipes/seed.yaml")).items():
        set_dotted(params_dict, key, value, "the seed recipe")
    return params_dict


def small(params_dict: dict[str, Any], **train: Any) -> Any:
    """The seed's training of a narrow network (5,934 parameters), with `train` changes."""
    params_dict = seed_params(params_dict)
    params_dict["model"].update(conv_filters=[4, 8], dense_units=16)
    params_dict["train"].update({"epochs": 2, "batch_size": 16, **train})
    return params_from_dict(params_dict)


def test_the_seed_network_has_1_250_858_parameters_and_takes_raw_pixels(
    params_dict: dict[str, Any],
) -> None:
    model = build_model(params_from_dict(seed_params(params_dict)).model)
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
    compile_model(model, params.train, steps_per_epoch(160, params.train))
    train, _ = tiny_splits
    for _ in range(7):
        model.train_on_batch(train.images[:16], train.labels[:16])
    optimizer = model.optimizer
    assert int(optimizer.iterations) == 7
    assert float(optimizer.learning_rate) == pytest.approx(0.05 / (1 + 0.1 * 7), rel=1e-6)
    assert optimizer.momentum == pytest.approx(0.9) and optimizer.nesterov


@pytest.mark.slow  # trains
def test_fit_records_every_epoch_with_the_learning_rate(
    params_dict: dict[str, Any], tiny_splits: tuple[Split, Split]
) -> None:
    params = small(params_dict, epochs=3)
    model = prepared_model(lambda: build_model(params.model), params, 160)
    history = fit(model, *tiny_splits, params.train, verbose=0)
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"}
    assert all(len(values) == 3 for values in history.values())
    steps = 10  # 160 images / batch 16
    expected_lr = [0.01 / (1 + 1e-6 * steps * epoch) for epoch in (1, 2, 3)]
    np.testing.assert_allclose(history["learning_rate"], expected_lr, rtol=1e-6)


@pytest.mark.slow  # trains
def test_same_seed_with_determinism_gives_the_same_metrics(
    params_dict: dict[str, Any], tiny_splits: tuple[Split, Split]
) -> None:
    params = small(params_dict, deterministic=True)

    def train_once() -> dict[str, list[float]]:
        model = prepared_model(lambda: build_model(params.model), params, 160)
        return fit(model, *tiny_splits, params.train, verbose=0)

    assert train_once() == train_once()


@pytest.mark.slow  # trains
def test_a_nan_loss_stops_training_with_a_clear_error(
    params_dict: dict[str, Any], tiny_splits: tuple[Split, Split]
) -> None:
    params = small(params_dict, learning_rate=1e9, epochs=5)
    model = prepared_model(lambda: build_model(params.model), params, 160)
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
        images, AugmentParams(flip=True, translate=0.0, cutout=0), tf.random.Generator.from_seed(0)
    ).numpy()
    original = images.numpy()
    is_flipped = [np.array_equal(f, o[:, ::-1]) for f, o in zip(flipped, original, strict=True)]
    is_same = [np.array_equal(f, o) for f, o in zip(flipped, original, strict=True)]
    assert all(a or b for a, b in zip(is_flipped, is_same, strict=True))
    assert 10 < sum(is_flipped) < 54  # about half, image by image

    shifted = augment_batch(
        images,
        AugmentParams(flip=False, translate=0.125, cutout=0),
        tf.random.Generator.from_seed(0),
    ).numpy()
    assert shifted.dtype == np.uint8 and shifted.shape == original.shape
    for out, src in zip(shifted[:16], original[:16], strict=True):
        # Each output is the source moved by at most 4 pixels each way, zero-padded.
        padded = np.pad(src, ((4, 4), (4, 4), (0, 0)))
        assert any(
            np.array_equal(out, padded[r : r + 32, c : c + 32]) for r in range(9) for c in range(9)
        )
    assert not np.array_equal(shifted, original)


def test_symmetric_pixels_span_minus_one_to_one_and_he_init_scales_for_relu(
    params_dict: dict[str, Any],
) -> None:
    params_dict["model"].update(pixel_scale="symmetric", kernel_initializer="he_normal")
    model = build_model(params_from_dict(params_dict).model)
    scale = model.get_layer("scale")
    pixels = np.array([0, 127.5, 255], dtype=np.float32)
    np.testing.assert_allclose(pixels * scale.scale + scale.offset, [-1, 0, 1], atol=1e-6)
    assert model.count_params() == 1_250_858
    first = model.get_layer("conv1a").kernel.numpy()  # He: std sqrt(2 / fan_in), fan_in 27
    assert float(first.std()) == pytest.approx((2 / 27) ** 0.5, rel=0.15)
    glorot = build_model(params_from_dict(seed_params(params_dict)).model)  # sqrt(2 / 315)
    assert float(glorot.get_layer("conv1a").kernel.numpy().std()) == pytest.approx(
        (2 / (27 + 288)) ** 0.5, rel=0.15
    )
    assert model.get_layer("probabilities").kernel_initializer.__class__.__name__ == "GlorotUniform"


@pytest.mark.slow  # trains
@pytest.mark.parametrize("restore_best", [True, False])
def test_the_model_keeps_its_best_or_its_last_epoch(
    params_dict: dict[str, Any], tiny_splits: tuple[Split, Split], restore_best: bool
) -> None:
    params = small(params_dict, epochs=6, learning_rate=0.05, restore_best=restore_best)
    model = prepared_model(lambda: build_model(params.model), params, 160)
    history = fit(model, *tiny_splits, params.train, verbose=0)
    _, validation = tiny_splits
    accuracy = float(
        np.mean(model.predict(validation.images, verbose=0).argmax(axis=1) == validation.labels)
    )
    expected = max(history["val_accuracy"]) if restore_best else history["val_accuracy"][-1]
    assert accuracy == pytest.approx(expected, abs=1e-6)


# --- the recipe options: schedules, batch scaling, weight decay, smoothing, precision, cutout ---


def reference_rate(schedule: str, step: int, peak: float, spe: int, total: int) -> float:
    """The schedules written out in plain Python, step by step."""
    warmup = 2 * spe  # warmup_epochs 2
    if schedule == "step":  # x0.5 every 3 epochs
        return peak * 0.5 ** (step // (3 * spe))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / (total - warmup), 1.0)
    if schedule == "cosine":
        return peak * 0.5 * (1 + np.cos(np.pi * progress))
    return peak * (1 - progress)


@pytest.mark.parametrize("schedule", ["step", "cosine", "one_cycle"])
def test_each_schedule_sets_the_rate_its_formula_gives_at_every_step(
    params_dict: dict[str, Any], schedule: str
) -> None:
    from pipeline.training_loop import learning_rate

    params = small(
        params_dict, schedule=schedule, epochs=8, learning_rate=0.2, warmup_epochs=2,
        step_epochs=3, step_factor=0.5,
    )  # fmt: skip
    spe = 10
    rate = learning_rate(params.train, spe)
    steps = range(0, 8 * spe + 1)
    got = [float(rate(step)) for step in steps]
    want = [reference_rate(schedule, step, 0.2, spe, 8 * spe) for step in steps]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    if schedule != "step":  # rises during the warm-up, peaks, and ends at zero
        assert got[0] < got[19] == pytest.approx(0.2) and got[-1] == pytest.approx(0, abs=1e-7)


def test_the_optimiser_follows_the_schedule_and_it_survives_saving(
    params_dict: dict[str, Any], tiny_splits: tuple[Split, Split], tmp_path: Any
) -> None:
    params = small(params_dict, schedule="one_cycle", warmup_epochs=1, epochs=2)
    model = build_model(params.model)
    compile_model(model, params.train, steps_per_epoch(160, params.train))
    train, _ = tiny_splits
    for _ in range(4):
        model.train_on_batch(train.images[:16], train.labels[:16])
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01 * 5 / 10, rel=1e-6)
    model.save(tmp_path / "m.keras")  # a resumed run reloads the schedule with the optimiser
    again = keras.saving.load_model(tmp_path / "m.keras")
    assert int(again.optimizer.iterations) == 4
    assert float(again.optimizer.learning_rate) == pytest.approx(0.005, rel=1e-6)


def test_a_base_batch_size_scales_the_learning_rate_linearly(params_dict: dict[str, Any]) -> None:
    assert small(params_dict, batch_size=256).train.peak_learning_rate == 0.01
    scaled = small(params_dict, batch_size=256, learning_rate=0.02, base_batch_size=64)
    assert scaled.train.peak_learning_rate == pytest.approx(0.08)
    from pipeline.training_loop import learning_rate

    assert float(learning_rate(scaled.train, 10)(0)) == pytest.approx(0.08)


def test_weight_decay_shrinks_each_weight_by_lr_times_decay_per_step(
    params_dict: dict[str, Any], tiny_splits: tuple[Split, Split]
) -> None:
    train, _ = tiny_splits

    def one_step(weight_decay: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
        params = small(params_dict, learning_rate=0.1, weight_decay=weight_decay)
        raw = dict(params_dict)
        raw["model"] = {**params_dict["model"], "conv_dropout": 0.0, "dense_dropout": 0.0}
        model = build_model(params_from_dict(raw).model)
        compile_model(model, params.train, 10)
        before = model.get_weights()
        model.train_on_batch(train.images[:16], train.labels[:16])
        return before, model.get_weights()

    before, plain = one_step(0.0)
    _, decayed = one_step(0.01)
    for w0, w_plain, w_decayed in zip(before, plain, decayed, strict=True):
        np.testing.assert_allclose(w_decayed - w_plain, -0.1 * 0.01 * w0, atol=2e-6)


@pytest.mark.slow  # trains
def test_label_smoothing_trains_on_softened_one_hot_targets(
    params_dict: dict[str, Any], tiny_splits: tuple[Split, Split]
) -> None:
    from pipeline.training_loop import make_loss

    params = small(params_dict, label_smoothing=0.1)
    probabilities = np.array([[0.7, 0.2, 0.1] + [0.0] * 7], dtype=np.float32) + 1e-4
    probabilities /= probabilities.sum()
    target = np.eye(10, dtype=np.float32)[[0]]
    smoothed = target * 0.9 + 0.1 / 10  # 0.91 for the true class, 0.01 for each other one
    want = -np.sum(smoothed * np.log(probabilities))
    assert float(make_loss(params.train)(target, probabilities)) == pytest.approx(want, rel=1e-4)

    batch = next(iter(input_pipeline(tiny_splits[0], 16, one_hot=True)))[1].numpy()
    assert batch.shape == (16, 10) and np.array_equal(batch.argmax(1), tiny_splits[0].labels[:16])
    model = prepared_model(lambda: build_model(params.model), params, 160)
    history = fit(model, *tiny_splits, params.train, verbose=0)
    validation = tiny_splits[1]  # "accuracy" is still the share of right answers
    predicted = model.predict(validation.images, verbose=0).argmax(axis=1)
    best = max(history["val_accuracy"])
    assert float(np.mean(predicted == validation.labels)) == pytest.approx(best, abs=1e-6)


@pytest.mark.slow  # trains
def test_mixed_bfloat16_computes_in_bfloat16_and_saves_a_float32_model(
    params_dict: dict[str, Any], tiny_splits: tuple[Split, Split]
) -> None:
    from pipeline.model import portable, with_precision

    params = small(params_dict, precision="mixed_bfloat16", epochs=6, learning_rate=0.01)
    untrained = build_model(params.model)
    model = with_precision(untrained, params.model, "mixed_bfloat16")
    conv = model.get_layer("conv1b")
    assert conv.compute_dtype == "bfloat16" and conv.kernel.dtype == "float32"
    assert model.get_layer("probabilities").compute_dtype == "float32"
    for a, b in zip(untrained.get_weights(), model.get_weights(), strict=True):
        assert np.array_equal(a, b)  # the same starting point, exactly
    seed_everything(params.train)
    compile_model(model, params.train, steps_per_epoch(160, params.train))
    history = fit(model, *tiny_splits, params.train, verbose=0)
    assert history["loss"][-1] < history["loss"][0]
    served = portable(model, params.model)
    assert served.get_layer("conv1b").compute_dtype == "float32" and not served.compiled
    images = tiny_splits[1].images
    np.testing.assert_allclose(
        served.predict(images, verbose=0), model.predict(images, verbose=0), atol=0.03
    )


def test_cutout_blanks_one_square_per_image_and_nothing_else(
    tiny_splits: tuple[Split, Split],
) -> None:
    import tensorflow as tf

    images = np.full((64, 32, 32, 3), 200, dtype=np.uint8)
    out = augment_batch(
        tf.constant(images), AugmentParams(flip=False, translate=0.0, cutout=8),
        tf.random.Generator.from_seed(0),
    ).numpy()  # fmt: skip
    assert set(np.unique(out)) == {0, 200}
    sizes = []
    for image in out:
        blank = np.all(image == 0, axis=-1)
        rows, cols = np.flatnonzero(blank.any(axis=1)), np.flatnonzero(blank.any(axis=0))
        assert blank.sum() == len(rows) * len(cols)  # one rectangle...
        assert np.ptp(rows) == len(rows) - 1 and np.ptp(cols) == len(cols) - 1  # ...in one piece
        assert 4 <= len(rows) <= 8 and 4 <= len(cols) <= 8  # cut off at the border at most by half
        sizes.append(blank.sum())
    assert sizes.count(64) > 16  # most squares lie wholly inside the image


def test_a_warm_up_as_long_as_the_training_is_refused(params_dict: dict[str, Any]) -> None:
    from pipeline.config import ParamsError

    with pytest.raises(
        ParamsError, match=r"train: warmup_epochs \(2.0\) must be below epochs \(2\)"
    ):
        small(params_dict, schedule="cosine", warmup_epochs=2)

"""Benchmark: the train stage's training loop versus a plain `model.fit` on NumPy arrays.

All sides train the same network with the same optimiser and batch size on the same prepared
arrays (run `dvc repro preprocess` first), one after the other, each in its own process:

- `plain`: `model.fit(x, y, batch_size=..., shuffle=True, validation_data=...)` in float32, the
  way the seed's example trains.
- `pipeline_float32`: what `python -m pipeline.train` runs (`pipeline.training_loop.fit` with the
  MLflow epoch logger into a throwaway store and the per-epoch checkpoint), in float32: the
  input pipeline's own effect.
- `pipeline`: the same with the recipe's precision (bfloat16 for `best` and `fast`): what the
  stage runs as shipped.

Throughput is training images per second over every epoch after the first (which traces the
graph), validation included on every side; the mean counts the slow epochs that a median hides.

How close to the machine's limit: each side's arithmetic rate in GFLOP/s (the network's
multiply-adds per image, counted from its layers, times 2 for a forward pass and times 3 for
training: forward, the gradient of the inputs and that of the weights), against the peak of a
large float32 and a large bfloat16 matrix product timed in the same run.

    python benchmarks/train_throughput.py --recipe best --epochs 5

Writes benchmarks/results/train_throughput.json (or --name).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.accuracy import machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SIDES = ("plain", "pipeline_float32", "pipeline")


def run_side(side: str, recipe: str | None, epochs: int, batch_size: int) -> dict[str, Any]:
    """Trains one side in this process; returns per-epoch seconds (and tracking seconds)."""
    import keras
    import numpy as np

    from pipeline.config import load_params, shorter_run, with_values
    from pipeline.model import build_model
    from pipeline.params_edit import load_recipe
    from pipeline.splits import load_split
    from pipeline.training_loop import fit, one_hot_labels, prepared_model

    params = load_params()
    if recipe:
        params = with_values(params, load_recipe(recipe))
    values: dict[str, Any] = {**shorter_run(params, epochs), "train.batch_size": batch_size}
    if side != "pipeline":
        values["train.precision"] = "float32"
    params = with_values(params, values)
    train = load_split(params.paths.prepared, "train")
    validation = load_split(params.paths.prepared, "validation")
    model = prepared_model(
        lambda: build_model(params.model, params.train.precision), params, len(train)
    )

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seconds: list[float] = []

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.seconds.append(time.perf_counter() - self.start)

    timer = EpochTimer()
    tracking_seconds: list[float] = []
    if side == "plain":

        def targets(labels: Any) -> Any:  # the recipe's loss: one-hot under label smoothing
            return np.eye(10, dtype="float32")[labels] if one_hot_labels(params.train) else labels

        model.fit(
            train.images, targets(train.labels), batch_size=batch_size, epochs=epochs,
            validation_data=(validation.images, targets(validation.labels)), shuffle=True,
            callbacks=[timer], verbose=2,
        )  # fmt: skip
    else:
        import mlflow

        from pipeline import tracking
        from pipeline.checkpoint import EpochCheckpoint
        from pipeline.training_loop import BestWeights

        class Timed(keras.callbacks.Callback):
            """Times the tracking callbacks (MLflow logging + checkpoint) inside each epoch."""

            def __init__(self, inner: list[keras.callbacks.Callback]) -> None:
                super().__init__()
                self.inner = inner

            def set_model(self, model: keras.Model) -> None:
                super().set_model(model)
                for callback in self.inner:
                    callback.set_model(model)

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                start = time.perf_counter()
                for callback in self.inner:
                    callback.on_epoch_end(epoch, logs)
                tracking_seconds.append(time.perf_counter() - start)

        with tempfile.TemporaryDirectory() as tmp:
            mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
            best = BestWeights()
            with tracking.tracked_run("benchmark") as run:
                checkpoint = Path(tmp) / "checkpoint"
                inner = [
                    EpochCheckpoint(checkpoint, "benchmark", run.info.run_id, {}, best),
                    tracking.epoch_logger(),
                ]
                fit(
                    model, train, validation, params.train,
                    callbacks=[Timed(inner), timer], best=best, verbose=2,
                )  # fmt: skip
    return {
        "epoch_seconds": timer.seconds,
        "tracking_seconds": tracking_seconds,
        "train_images": len(train),
        "precision": params.train.precision,
    }


def training_flops_per_image(recipe: str | None) -> int:
    """Floating-point operations of one training image: 3 x 2 x the forward multiply-adds of the
    convolutions and dense layers (pooling, activations and the optimiser are left out)."""
    import keras

    from pipeline.config import load_params, with_values
    from pipeline.model import build_model
    from pipeline.params_edit import load_recipe

    params = load_params()
    if recipe:
        params = with_values(params, load_recipe(recipe))
    macs = 0
    for layer in build_model(params.model).layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, filters = layer.output.shape
            kernel_h, kernel_w, channels, _ = layer.kernel.shape
            macs += height * width * filters * kernel_h * kernel_w * channels
        elif isinstance(layer, keras.layers.Dense):
            macs += int(layer.kernel.shape[0]) * int(layer.kernel.shape[1])
    return 3 * 2 * macs


def matmul_peak(dtype: str, size: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of the best of `repeats` size x size matrix products in `dtype`."""
    import tensorflow as tf

    a = tf.random.uniform((size, size), dtype=tf.float32)
    a = tf.cast(a, dtype)
    product = tf.function(lambda x: tf.reduce_sum(tf.cast(tf.linalg.matmul(x, x), tf.float32)))
    product(a).numpy()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        product(a).numpy()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    steady = result["epoch_seconds"][1:] or result["epoch_seconds"]
    mean = statistics.mean(steady)
    summary = {
        "precision": result["precision"],
        "epoch_seconds": [round(s, 2) for s in result["epoch_seconds"]],
        "mean_epoch_seconds_after_first": round(mean, 2),
        "images_per_second": round(result["train_images"] / mean, 1),
        "images_per_second_median_epoch": round(
            result["train_images"] / statistics.median(steady), 1
        ),
    }
    if result["tracking_seconds"]:
        tracking = result["tracking_seconds"][1:] or result["tracking_seconds"]
        summary["tracking_seconds_per_epoch"] = [round(s, 3) for s in result["tracking_seconds"]]
        summary["tracking_share_of_epoch"] = round(statistics.mean(tracking) / mean, 4)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="best", help="recipes/NAME (its model and optimiser)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--name", default="train_throughput", help="results/<name>.json")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:  # a child process: one side, result to --output
        result = run_side(args.side, args.recipe, args.epochs, args.batch_size)
        args.output.write_text(json.dumps(result))
        return

    sides = {}
    for side in SIDES:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            subprocess.run(
                [sys.executable, __file__, "--side", side, "--recipe", args.recipe,
                 "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                 "--output", out.name],
                check=True,
            )  # fmt: skip
            sides[side] = summarize(json.loads(Path(out.name).read_text()))
    plain = sides["plain"]["images_per_second"]
    flops = training_flops_per_image(args.recipe)
    peaks = {dtype: round(matmul_peak(dtype), 1) for dtype in ("float32", "bfloat16")}
    for summary in sides.values():
        gflops = summary["images_per_second"] * flops / 1e9
        peak = peaks["bfloat16" if summary["precision"] == "mixed_bfloat16" else "float32"]
        summary["gflop_per_second"] = round(gflops, 1)
        summary["share_of_matmul_peak"] = round(gflops / peak, 3)
    report = {
        "benchmark": "train stage throughput vs plain model.fit on NumPy arrays",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "recipe": args.recipe,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "training_gflop_per_image": round(flops / 1e9, 4),
        "matmul_peak_gflop_per_second": peaks,
        "results": sides,
        "throughput_ratio": round(sides["pipeline"]["images_per_second"] / plain, 3),
        "throughput_ratio_float32": round(
            sides["pipeline_float32"]["images_per_second"] / plain, 3
        ),
        "goals": {"throughput_ratio_at_least": 2.0, "tracking_share_of_epoch_below": 0.01},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

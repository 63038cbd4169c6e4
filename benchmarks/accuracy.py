"""Benchmark: test accuracy and time to 75% of the shipped recipes against the reference recipes.

Every side trains the same 1,250,858-parameter network on the same prepared splits (run
`dvc repro preprocess` first) and is scored on the test split after every epoch; that scoring is
left out of the timings. Sides:

- `seed` (baseline): the seed's recipe as the original example ran it: a plain `model.fit` on
  NumPy arrays, SGD 0.01, Nesterov momentum 0.9, time decay 1e-6, batch 32, no augmentation.
- `keras_example` (baseline): the Keras CIFAR-10 example's own optimiser and augmentation:
  RMSprop 1e-4 with time decay 1e-6, batch 32, random shifts of up to 10% (edges repeated) and
  horizontal flips, on the same plain `model.fit`.
- a recipe in recipes/ (`fast`, `best`, ...): the pipeline's own `fit` with the recipe applied to
  params.yaml, exactly as `dvc repro` trains it (validation after every epoch included in its
  time). Its test accuracy is that of the epoch the pipeline keeps (best validation accuracy,
  with train.restore_best), which is what `dvc repro` reports.

Seed k sets the initial weights and the shuffling (model.init_seed = train.seed = k). Each
(side, seed) runs in a fresh process and is kept in benchmarks/results/runs/, so an interrupted
benchmark resumes where it stopped and a figure can grow by seeds without retraining; a kept run
whose recipe has changed since is trained again.

    python benchmarks/accuracy.py --sides seed fast --seeds 3 --until-target --name time_to_accuracy
    python benchmarks/accuracy.py --sides seed keras_example best --seeds 3 --name best_accuracy

Writes benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
RUNS = RESULTS / "runs"
BASELINES = ("seed", "keras_example")
TARGET = 0.75  # the test accuracy whose time is measured


# --- one run (in a child process) -----------------------------------------------------------------


def run_values(side: str, seed: int, epochs: int | None) -> dict[str, Any]:
    """The params.yaml values one (side, seed) run trains with: its recipe and the seed."""
    from pipeline.params_edit import load_recipe

    # The baselines train the seed's own network: its dropout, x / 255 pixels, glorot init.
    recipe = load_recipe("seed" if side in BASELINES else side)
    values: dict[str, Any] = {**recipe, "model.init_seed": seed, "train.seed": seed}
    if epochs is not None:
        values["train.epochs"] = epochs
    return values


def train_one(side: str, seed: int, epochs: int | None, until_target: bool) -> dict[str, Any]:
    """Trains one side with one seed; returns its per-epoch record. With `until_target`, the
    run stops at the first epoch whose test accuracy reaches 75% (enough for a time to 75%)."""
    import keras
    import numpy as np

    from pipeline.config import load_params, with_values
    from pipeline.splits import load_split

    params = load_params()
    values = run_values(side, seed, epochs)
    params = with_values(params, values)
    train = load_split(params.paths.prepared, "train")
    validation = load_split(params.paths.prepared, "validation")
    test = load_split(params.paths.prepared, "test")

    records: list[dict[str, Any]] = []

    class Scorer(keras.callbacks.Callback):
        """Times each epoch's training (and validation) and scores the test split, untimed."""

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self.start = time.perf_counter()
            self.validation_start: float | None = None

        def on_test_begin(self, logs: Any = None) -> None:
            self.validation_start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            end = time.perf_counter()
            trained = (self.validation_start or end) - self.start
            predicted = self.model.predict(test.images, batch_size=500, verbose=0).argmax(axis=1)
            logs = logs or {}
            records.append(
                {
                    "epoch": epoch + 1,
                    "train_seconds": round(trained, 3),
                    "epoch_seconds": round(end - self.start, 3),
                    "loss": round(float(logs.get("loss", float("nan"))), 5),
                    "val_accuracy": logs.get("val_accuracy"),
                    "test_accuracy": round(float(np.mean(predicted == test.labels)), 5),
                }
            )
            print(side, seed, records[-1], flush=True)
            if until_target and records[-1]["test_accuracy"] >= TARGET:
                self.model.stop_training = True

    if side in BASELINES:
        train_baseline(side, params, train, Scorer())
    else:
        from pipeline.model import build_model
        from pipeline.training_loop import fit, prepared_model

        model = prepared_model(
            lambda: build_model(params.model, params.train.precision), params, len(train)
        )
        fit(model, train, validation, params.train, callbacks=[Scorer()], verbose=0)
    return {
        "side": side,
        "seed": seed,
        "recipe": values,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "epochs": records,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def train_baseline(side: str, params: Any, train: Any, scorer: Any) -> None:
    """The reference recipes, written as their authors ran them: plain Keras on NumPy arrays."""
    import keras
    import tensorflow as tf

    from pipeline.model import build_model

    keras.utils.set_random_seed(params.train.seed)
    model = build_model(params.model)  # the same network, float32
    decay = keras.optimizers.schedules.InverseTimeDecay  # Keras 2's `decay=`, per step
    if side == "seed":
        optimizer = keras.optimizers.SGD(
            learning_rate=decay(0.01, decay_steps=1, decay_rate=1e-6), momentum=0.9, nesterov=True
        )
        model.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"])
        model.fit(
            train.images, train.labels, batch_size=32, epochs=params.train.epochs,
            shuffle=True, callbacks=[scorer], verbose=0,
        )  # fmt: skip
        return
    # keras_example: RMSprop(lr=0.0001, decay=1e-6) and ImageDataGenerator(width_shift_range=0.1,
    # height_shift_range=0.1, horizontal_flip=True), whose fill mode repeats the edge pixels.
    optimizer = keras.optimizers.RMSprop(learning_rate=decay(1e-4, decay_steps=1, decay_rate=1e-6))
    model.compile(optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"])
    shift = keras.layers.RandomTranslation(0.1, 0.1, fill_mode="nearest", seed=params.train.seed)
    flip = keras.layers.RandomFlip("horizontal", seed=params.train.seed)
    batches = (
        tf.data.Dataset.from_tensor_slices((train.images, train.labels))
        .shuffle(len(train), seed=params.train.seed)
        .batch(32)
        .map(lambda x, y: (tf.cast(flip(shift(tf.cast(x, "float32"))), "uint8"), y))
        .prefetch(tf.data.AUTOTUNE)
    )
    model.fit(batches, epochs=params.train.epochs, callbacks=[scorer], shuffle=False, verbose=0)


# --- the report -----------------------------------------------------------------------------------


def kept_epoch(run: dict[str, Any]) -> dict[str, Any]:
    """The epoch whose model the side ends with: the best by validation accuracy for the
    pipeline (train.restore_best), the last for the baselines (they keep no validation set)."""
    epochs = run["epochs"]
    if run["side"] in BASELINES or epochs[0]["val_accuracy"] is None:
        return epochs[-1]
    return max(epochs, key=lambda e: e["val_accuracy"])


def time_to_target(run: dict[str, Any], key: str) -> float | None:
    """Seconds of training (summing `key` per epoch) until the test accuracy first reaches 75%."""
    seconds = 0.0
    for epoch in run["epochs"]:
        seconds += epoch[key]
        if epoch["test_accuracy"] >= TARGET:
            return round(seconds, 1)
    return None


def stats(values: list[float | None], digits: int = 4) -> dict[str, Any]:
    """Mean, sample standard deviation, min and max over seeds (None if any seed missed)."""
    if not values or any(v is None for v in values):
        return {"values": values, "mean": None}
    numbers = [round(float(v), digits) for v in values if v is not None]
    return {
        "values": numbers,
        "mean": round(statistics.mean(numbers), digits),
        "std": round(statistics.stdev(numbers), digits) if len(numbers) > 1 else None,
        "min": min(numbers),
        "max": max(numbers),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    kept = [kept_epoch(r) for r in runs]
    return {
        "seeds": [r["seed"] for r in runs],
        "epochs": len(runs[0]["epochs"]),
        "test_accuracy": stats([e["test_accuracy"] for e in kept]),
        "kept_epoch": [e["epoch"] for e in kept],
        "best_test_accuracy_any_epoch": stats(
            [max(e["test_accuracy"] for e in r["epochs"]) for r in runs]
        ),
        "seconds_to_75_training": stats([time_to_target(r, "train_seconds") for r in runs], 1),
        "seconds_to_75_with_validation": stats(
            [time_to_target(r, "epoch_seconds") for r in runs], 1
        ),
        "epochs_to_75": stats(
            [
                next((e["epoch"] for e in r["epochs"] if e["test_accuracy"] >= TARGET), None)
                for r in runs
            ],
            1,
        ),
        "training_seconds": stats([sum(e["train_seconds"] for e in r["epochs"]) for r in runs], 1),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", nargs="+", default=["seed", "fast"])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N")
    parser.add_argument(
        "--baseline-seeds", type=int, help="seeds 1..N for the baselines (default: --seeds)"
    )
    parser.add_argument("--epochs", type=int, help="override every side's epochs")
    parser.add_argument(
        "--until-target",
        action="store_true",
        help="stop each baseline run once its test accuracy reaches 75%% (time to 75%% only)",
    )
    parser.add_argument("--name", default="accuracy", help="results/<name>.json")
    parser.add_argument("--run", nargs=2, metavar=("SIDE", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    def run_path(side: str, seed: int) -> Path:
        tag = "" if args.epochs is None else f"-e{args.epochs}"
        if args.until_target and side in BASELINES:
            tag += "-to75"
        return RUNS / f"{side}{tag}-seed{seed}.json"

    if args.run:  # a child process: one side, one seed
        side, seed = args.run[0], int(args.run[1])
        record = train_one(side, seed, args.epochs, args.until_target and side in BASELINES)
        RUNS.mkdir(parents=True, exist_ok=True)
        run_path(side, seed).write_text(json.dumps(record, indent=1) + "\n")
        return

    sides: dict[str, Any] = {}
    for side in args.sides:
        runs = []
        seeds = args.seeds
        if side in BASELINES and args.baseline_seeds is not None:
            seeds = args.baseline_seeds
        for seed in range(1, seeds + 1):
            path = run_path(side, seed)
            run = json.loads(path.read_text()) if path.is_file() else None
            if run is not None and run["recipe"] != run_values(side, seed, args.epochs):
                print(f"{path}: trained with another recipe; training it again", flush=True)
                run = None
            if run is not None and run.get("machine") != machine():  # ratios need one machine
                print(f"{path}: trained on another machine; training it again", flush=True)
                run = None
            if run is None:  # not run yet, interrupted, or its recipe changed: (re)run it
                command = [sys.executable, __file__, "--run", side, str(seed)]
                if args.epochs is not None:
                    command += ["--epochs", str(args.epochs)]
                if args.until_target:
                    command.append("--until-target")
                subprocess.run(command, check=True)
                run = json.loads(path.read_text())
            runs.append(run)
        sides[side] = summarize(runs)
        print(side, json.dumps(sides[side]), flush=True)

    report: dict[str, Any] = {
        "benchmark": "test accuracy and time to 75% test accuracy, per side, over seeds",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "sides": sides,
    }
    if "seed" in sides:  # every claim as a ratio against the seed's recipe on this machine
        base = sides["seed"]
        report["versus_seed"] = {
            side: {
                "speedup_to_75": ratio(
                    base["seconds_to_75_training"]["mean"],
                    figures["seconds_to_75_training"]["mean"],
                ),
                # a baseline stopped at 75% has no final accuracy to compare with
                "test_accuracy_points": None
                if figures["test_accuracy"]["mean"] is None or args.until_target
                else round(
                    100 * (figures["test_accuracy"]["mean"] - base["test_accuracy"]["mean"]), 2
                ),
            }
            for side, figures in sides.items()
            if side != "seed"
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def ratio(baseline: float | None, ours: float | None) -> float | None:
    return None if baseline is None or ours is None else round(baseline / ours, 2)


def machine() -> str:
    """CPU model and core count, as the README's tables name the machine."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        bf16 = " (AVX-512 BF16)" if "avx512_bf16" in Path("/proc/cpuinfo").read_text() else ""
    except OSError:
        bf16 = ""
    return f"{model}{bf16}, {os.cpu_count()} cores, {platform.machine()}"


if __name__ == "__main__":
    main()

"""Benchmark: the train stage's training loop versus a plain `model.fit` on NumPy arrays.

Both sides build the same model with the same optimiser and batch size and train on the same
prepared arrays (run `dvc repro preprocess` first). The pipeline side is what `python -m
pipeline.train` runs: `pipeline.training.fit` with the MLflow epoch logger (into a throwaway
store) and the per-epoch checkpoint. Each side runs in its own process, one after the other.
Throughput counts training images per second of epoch wall time (validation included on both
sides); the first epoch (graph tracing) is left out.

    python benchmarks/train_throughput.py --epochs 4

Writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def run_side(side: str, epochs: int, batch_size: int) -> dict[str, Any]:
    """Trains in this process and returns per-epoch seconds (and tracking seconds)."""
    import keras

    from pipeline.config import load_params
    from pipeline.dataset import load_split
    from pipeline.model import build_model
    from pipeline.training import compile_model, fit, seed_everything

    params = load_params()
    train_params = params.train.__class__(
        **{**params.train.__dict__, "epochs": epochs, "batch_size": batch_size}
    )
    train = load_split(params.paths.prepared, "train")
    validation = load_split(params.paths.prepared, "validation")
    seed_everything(train_params)
    model = build_model(params.model)
    compile_model(model, train_params)

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
        model.fit(
            train.images,
            train.labels,
            batch_size=batch_size,
            epochs=epochs,
            validation_data=(validation.images, validation.labels),
            shuffle=True,
            callbacks=[timer],
            verbose=2,
        )
    else:
        import mlflow

        from pipeline import tracking
        from pipeline.train import EpochCheckpoint

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
            with tracking.tracked_run("benchmark") as run:
                inner = [
                    EpochCheckpoint(Path(tmp) / "checkpoint", "benchmark", run.info.run_id, {}),
                    tracking.EpochLogger(),
                ]
                fit(
                    model,
                    train,
                    validation,
                    train_params,
                    callbacks=[Timed(inner), timer],
                    verbose=2,
                )
    return {
        "epoch_seconds": timer.seconds,
        "tracking_seconds": tracking_seconds,
        "train_images": len(train),
    }


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    steady = result["epoch_seconds"][1:] or result["epoch_seconds"]
    median = statistics.median(steady)
    summary = {
        "epoch_seconds": [round(s, 2) for s in result["epoch_seconds"]],
        "median_epoch_seconds_after_first": round(median, 2),
        "images_per_second": round(result["train_images"] / median, 1),
    }
    if result["tracking_seconds"]:
        share = (
            statistics.median(result["tracking_seconds"][1:] or result["tracking_seconds"]) / median
        )
        summary["tracking_seconds_per_epoch"] = [round(s, 3) for s in result["tracking_seconds"]]
        summary["tracking_share_of_epoch"] = round(share, 4)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--side", choices=["plain", "pipeline"], help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:  # a child process: one side, result to --output
        args.output.write_text(json.dumps(run_side(args.side, args.epochs, args.batch_size)))
        return

    sides = {}
    for side in ("plain", "pipeline"):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            subprocess.run(
                [sys.executable, __file__, "--side", side, "--epochs", str(args.epochs),
                 "--batch-size", str(args.batch_size), "--output", out.name],
                check=True,
            )  # fmt: skip
            sides[side] = summarize(json.loads(Path(out.name).read_text()))
    ratio = sides["pipeline"]["images_per_second"] / sides["plain"]["images_per_second"]
    report = {
        "benchmark": "train stage throughput vs plain model.fit on NumPy arrays",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "results": sides,
        "throughput_ratio": round(ratio, 3),
        "goals": {"throughput_ratio_at_least": 1.0, "tracking_share_of_epoch_below": 0.01},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Benchmark: training steps per second in float32 and in mixed_bfloat16 on this CPU.

The shipped recipe computes in bfloat16, which is about 1.8x float32's speed on a CPU with
AVX-512 BF16 and several times slower on one without (emulated). This tells which one a machine
is in a minute: the recipe's network and optimiser, batch 128, random images, after one warm-up
epoch, the median of --repeats timed epochs of --batches batches each.

    python benchmarks/precision_speed.py

Writes benchmarks/results/precision_speed.json (or --name).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.accuracy import machine  # noqa: E402
from pipeline.config import load_params, with_values  # noqa: E402
from pipeline.model import build_model, native_bfloat16, with_precision  # noqa: E402
from pipeline.params_edit import load_recipe  # noqa: E402
from pipeline.training_loop import compile_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def images_per_second(precision: str, recipe: str, batches: int, repeats: int) -> list[float]:
    import keras

    params = with_values(
        load_params(ROOT / "params.yaml"), load_recipe(str(ROOT / "recipes" / f"{recipe}.yaml"))
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (128 * batches, 32, 32, 3), dtype=np.uint8)
    labels = keras.utils.to_categorical(rng.integers(0, 10, len(images)), 10)
    model = with_precision(build_model(params.model), params.model, precision)
    compile_model(model, params.train, batches)
    model.fit(images, labels, batch_size=128, epochs=1, verbose=0)  # warm-up: tracing, caches
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.fit(images, labels, batch_size=128, epochs=1, verbose=0)
        rates.append(len(images) / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="best")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="precision_speed", help="results/<name>.json")
    args = parser.parse_args()
    rates = {
        precision: images_per_second(precision, args.recipe, args.batches, args.repeats)
        for precision in ("float32", "mixed_bfloat16")
    }
    medians = {precision: round(statistics.median(r), 1) for precision, r in rates.items()}
    report = {
        "benchmark": "training images per second, float32 against mixed_bfloat16",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "native_bfloat16": native_bfloat16(),
        "recipe": args.recipe,
        "images_per_second": medians,
        "all_images_per_second": {p: [round(v, 1) for v in r] for p, r in rates.items()},
        "bfloat16_speedup": round(medians["mixed_bfloat16"] / medians["float32"], 3),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

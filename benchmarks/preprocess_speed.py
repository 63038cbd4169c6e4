"""Benchmark: the preprocess stage on the full real archive versus the reference way of loading it.

The reference is what `keras.datasets.cifar10` does: extract the tar.gz to disk, then
`pickle.load` each batch into one array (channels-last as a transposed view). The pipeline's side
is the whole preprocess stage core: decode in memory, split, write the .npy files and the report.
Each side runs in its own fresh process (so peak RSS is its own), alternating, `--repeats` times.

    python benchmarks/preprocess_speed.py --archive ../shared/data/cifar-10-python.tar.gz

Writes benchmarks/results/preprocess_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.accuracy import machine  # noqa: E402

REFERENCE = r"""
import os, pickle, resource, sys, tarfile, tempfile, time
import numpy as np
start = time.perf_counter()
with tempfile.TemporaryDirectory() as tmp:
    with tarfile.open(sys.argv[1]) as archive:
        archive.extractall(tmp, filter="data")
    folder = os.path.join(tmp, "cifar-10-batches-py")
    x = np.empty((50000, 3, 32, 32), dtype="uint8")
    y = np.empty((50000,), dtype="uint8")
    for i in range(1, 6):
        with open(os.path.join(folder, f"data_batch_{i}"), "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        x[(i - 1) * 10000 : i * 10000] = batch[b"data"].reshape(-1, 3, 32, 32)
        y[(i - 1) * 10000 : i * 10000] = batch[b"labels"]
    with open(os.path.join(folder, "test_batch"), "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    x_test = batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    y_test = np.array(batch[b"labels"], dtype="uint8")
    x = x.transpose(0, 2, 3, 1)
seconds = time.perf_counter() - start
print(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

PIPELINE = r"""
import resource, sys, tempfile, time
from pathlib import Path
from pipeline.config import PreprocessParams
from pipeline.preprocess import preprocess
start = time.perf_counter()
with tempfile.TemporaryDirectory() as tmp:
    params = PreprocessParams(validation_size=5000, seed=42)
    preprocess(Path(sys.argv[1]), params, Path(tmp) / "prepared", Path(tmp) / "data.json")
    seconds = time.perf_counter() - start
print(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def run_once(code: str, archive: Path) -> tuple[float, int]:
    output = subprocess.run(
        [sys.executable, "-c", code, str(archive)], check=True, capture_output=True, text=True
    ).stdout.split()
    return float(output[0]), int(output[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--archive", type=Path, default=Path("../shared/data/cifar-10-python.tar.gz")
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    runs: dict[str, list[tuple[float, int]]] = {"reference": [], "pipeline": []}
    for _ in range(args.repeats):  # alternate, so both sides see the same machine state
        runs["reference"].append(run_once(REFERENCE, args.archive))
        runs["pipeline"].append(run_once(PIPELINE, args.archive))

    summary = {}
    for side, results in runs.items():
        seconds = [s for s, _ in results]
        summary[side] = {
            "seconds_median": round(statistics.median(seconds), 3),
            "seconds_min": round(min(seconds), 3),
            "seconds_max": round(max(seconds), 3),
            "peak_rss_mb_max": round(max(rss for _, rss in results) / 2**20, 1),
        }
    speedup = summary["reference"]["seconds_median"] / summary["pipeline"]["seconds_median"]
    report = {
        "benchmark": "preprocess the full CIFAR-10 archive",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "python": platform.python_version(),
        "repeats": args.repeats,
        "results": summary,
        "speedup_median": round(speedup, 2),
        "goals": {"speedup_at_least": 1.0, "pipeline_peak_rss_mb_below": 1024},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "preprocess_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

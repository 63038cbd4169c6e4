"""Benchmark: the peak memory of every stage, on the real archive, with a recipe applied.

Runs each stage's command (`python -m pipeline.<stage>`, as dvc.yaml does) in order, in a fresh
copy of the project, and reads each process's peak resident memory from the kernel (wait4's
ru_maxrss). Training memory does not grow with epochs (the data and model are allocated once),
so the train stage runs `--epochs` epochs of the recipe; the sweep runs `--trials` trials of one
epoch on 10% of the training split.

    python benchmarks/stage_memory.py --recipe best --archive ../shared/data/cifar-10-python.tar.gz

Writes benchmarks/results/stage_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.accuracy import machine  # noqa: E402
from tests.helpers import copy_project, run_env  # noqa: E402 - the tests' project copy

RESULTS = Path(__file__).parent / "results"
STAGES = ("download", "preprocess", "build", "train", "evaluate", "tune")
GOAL_MB = 3 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--archive", type=Path, default=ROOT.parent / "shared/data/cifar-10-python.tar.gz"
    )
    parser.add_argument("--recipe", help="a recipe in recipes/ (default: params.yaml as it is)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--trials", type=int, default=4)
    args = parser.parse_args()

    from pipeline.config import load_params, shorter_run, with_values
    from pipeline.params_edit import load_recipe, update_params_file

    with tempfile.TemporaryDirectory() as tmp:
        project = copy_project(Path(tmp) / "project")
        (project / "recipes").mkdir(exist_ok=True)
        values = load_recipe(str(ROOT / "recipes" / f"{args.recipe}.yaml")) if args.recipe else {}
        values |= shorter_run(
            with_values(load_params(project / "params.yaml"), values), args.epochs
        )
        values |= {
            "tune.n_trials": args.trials,
            "tune.epochs": 1,
            "tune.train_fraction": 0.1,
        }
        update_params_file(project / "params.yaml", values)
        env = run_env(
            CIFAR10_URL=str(args.archive.resolve()),
            MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",
        )
        stages = {}
        for stage in STAGES:
            start = time.perf_counter()
            process = subprocess.Popen(
                [sys.executable, "-m", f"pipeline.{stage}"], cwd=project, env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert process.stderr is not None
            errors = process.stderr.read()
            _, status, usage = os.wait4(process.pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"stage {stage} failed:\n{errors[-3000:]}")
            stages[stage] = {
                "peak_rss_mb": round(usage.ru_maxrss / 1024),
                "seconds": round(time.perf_counter() - start, 1),
            }
            print(stage, stages[stage], flush=True)

    report = {
        "benchmark": "peak memory of each stage on the real archive",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "recipe": args.recipe or "params.yaml",
        "settings": values,
        "stages": stages,
        "largest_mb": max(s["peak_rss_mb"] for s in stages.values()),
        "goals": {"every_stage_below_mb": GOAL_MB},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "stage_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

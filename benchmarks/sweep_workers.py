"""Benchmark: 1, 2 and 4 sweep workers on the same tiny sweep against real servers.

Starts a throwaway PostgreSQL cluster (as the `postgres` user when run as root) and an
`mlflow server` backed by it, then for each worker count runs a fresh study of the same tiny sweep
(the tests' synthetic data, a narrow model) with that many `python -m pipeline.tune` processes.
Reports trials per minute, and the storage overhead per trial: the seconds a trial spends in
Optuna and MLflow calls rather than training, from the trials' own timings.

    python benchmarks/sweep_workers.py --trials 12

Writes benchmarks/results/sweep_workers.json.
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

import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import (  # noqa: E402 - the tests' own server and data helpers
    STUDY,
    SWEEP,
    copy_project,
    make_tiny_cifar,
    run,
    run_env,
    start_mlflow_server,
    start_postgres,
    tiny_params,
    write_params,
    write_python_archive,
)

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()

    postgres = start_postgres()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        server = start_mlflow_server(postgres.create_database("mlflow"), tmp_path / "artifacts")
        try:
            archive = write_python_archive(tmp_path / "cifar.tar.gz", make_tiny_cifar(per_class=20))
            project = copy_project(tmp_path / "project")
            tune = {**SWEEP, "n_trials": args.trials, "epochs": args.epochs, "pruner": "none"}
            write_params(project, tiny_params(archive, tune=tune))
            assert (
                run(["dvc", "repro", "preprocess"], project, CIFAR10_URL=str(archive)).returncode
                == 0
            )
            results = {}
            for count in args.workers:
                storage = postgres.create_database(f"workers_{count}")
                env = run_env(
                    OPTUNA_STORAGE=storage, MLFLOW_TRACKING_URI=server.url, **server.credentials()
                )
                start = time.perf_counter()
                workers = [
                    subprocess.Popen(["python", "-m", "pipeline.tune"], cwd=project, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    for _ in range(count)
                ]  # fmt: skip
                codes = [worker.wait() for worker in workers]
                seconds = time.perf_counter() - start
                trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials()
                finished = [t for t in trials if t.state.is_finished() and t.state.name != "FAIL"]
                durations = [t.duration.total_seconds() for t in finished if t.duration]
                fit_seconds = [t.user_attrs.get("fit", {}).get("seconds", 0.0) for t in finished]
                overhead = [d - f for d, f in zip(durations, fit_seconds, strict=True)]
                results[str(count)] = {
                    "exit_codes": codes,
                    "finished_trials": len(finished),
                    "wall_seconds": round(seconds, 1),
                    "trials_per_minute": round(60 * len(finished) / seconds, 2),
                    "median_trial_seconds": round(statistics.median(durations), 2),
                    "median_overhead_seconds_per_trial": round(statistics.median(overhead), 3),
                }
                print(count, results[str(count)], flush=True)
        finally:
            server.stop()
            postgres.stop()

    report = {
        "benchmark": "sweep workers on PostgreSQL + MLflow server",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "trials": args.trials,
        "epochs_per_trial": args.epochs,
        "results": results,
        "note": "all workers share this machine's cores, so more workers compete for the same CPU",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sweep_workers.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

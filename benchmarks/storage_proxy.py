"""Benchmark: the sweep's Optuna storage calls, straight to PostgreSQL and through Optuna's gRPC
storage proxy, side by side.

The sweep itself cannot run on the proxy: Optuna's `GrpcStorageProxy` is not a heartbeat
storage (no `record_heartbeat`), so a dead worker's trial would stay RUNNING and never be
retried. This measures the storage layer alone, as a sweep worker uses it, with no MLflow and
no training: W processes each run T trials of `ask` (TPE drawing the four params of
params.yaml's tune.space), three user attributes, E epochs of a drawn sleep each followed by
`report` and `should_prune`, one more attribute and `tell`. Per way of reaching the database
it writes:

- storage seconds per trial, p50 and p99 (the trial's time less its sleeps): over all trials
  and over the steady state (trials that started after every process had finished its first
  trial and ended before any process finished its last);
- trials per minute;
- peak PostgreSQL connections to the study's database (polled every 0.25 s);
- errors (a process that ended with a traceback) and trials not COMPLETE at the end.

    python benchmarks/storage_proxy.py --workers 32 --trials-per-worker 8

Writes benchmarks/results/storage_proxy.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import random
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.figures import quantile, steady_window  # noqa: E402
from tests.helpers import free_port, start_postgres  # noqa: E402

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # the proxy's

RESULTS = Path(__file__).parent / "results"
STUDY = "storage-proxy"
SPACE = {  # params.yaml's tune.space
    "train.learning_rate": (0.001, 0.1, True),
    "train.momentum": (0.5, 0.99, False),
    "model.conv_dropout": (0.0, 0.5, False),
    "model.dense_dropout": (0.0, 0.7, False),
}


def storage_for(way: str, url: str, proxy_port: int) -> Any:
    if way == "grpc":
        return optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=proxy_port)
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def worker(way: str, url: str, proxy_port: int, trials: int, epochs: int, seconds: float) -> list:
    """Runs `trials` trials; returns (start, end, storage seconds) of each."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name=STUDY,
        storage=storage_for(way, url, proxy_port),
        sampler=optuna.samplers.TPESampler(seed=random.randrange(2**31)),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5),
    )
    rng, timed = random.Random(), []
    for _ in range(trials):
        started, slept = time.time(), 0.0
        trial = study.ask()
        for name, (low, high, log) in SPACE.items():
            trial.suggest_float(name, low, high, log=log)
        for attr in ("worker", "mlflow_run_id", "process"):
            trial.set_user_attr(attr, f"{attr}-{trial.number}")
        value = 0.0
        for epoch in range(1, epochs + 1):
            pause = rng.uniform(0.5 * seconds, 1.5 * seconds)
            time.sleep(pause)
            slept += pause
            value = rng.uniform(0.1, 0.9)
            trial.report(value, step=epoch)
            trial.should_prune()
        trial.set_user_attr("fit", {"seconds": slept, "peak_rss_mb": 0.0})
        study.tell(trial, value)
        timed.append((started, time.time(), time.time() - started - slept))
    return timed


def serve_proxy(url: str, port: int) -> None:
    optuna.storages.run_grpc_proxy_server(
        optuna.storages.get_storage(url), host="127.0.0.1", port=port
    )


def measure(way: str, postgres: Any, args: argparse.Namespace) -> dict[str, Any]:
    import psycopg

    database = f"proxy_{way}"
    postgres.create_database(database)
    url = postgres.url(database)
    optuna.create_study(study_name=STUDY, storage=url, direction="maximize")
    context = multiprocessing.get_context("spawn")
    proxy_port, proxy = free_port(), None
    if way == "grpc":
        proxy = context.Process(target=serve_proxy, args=(url, proxy_port), daemon=True)
        proxy.start()
        time.sleep(3)  # the server imports Optuna and binds
    peak, done = [0], threading.Event()

    def poll() -> None:
        with psycopg.connect(postgres.url("postgres"), autocommit=True) as connection:
            while not done.is_set():
                query = "select count(*) from pg_stat_activity where datname = %s"
                (count,) = connection.execute(query, (database,)).fetchone()
                peak[0] = max(peak[0], int(count))
                time.sleep(0.25)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    started = time.time()
    job = (way, url, proxy_port, args.trials_per_worker, args.epochs, args.epoch_seconds)
    errors, per_worker = 0, []
    with context.Pool(args.workers) as pool:
        pending = [pool.apply_async(worker, job) for _ in range(args.workers)]
        for result in pending:
            try:
                per_worker.append(result.get(timeout=3600))
            except Exception as error:  # counted and shown: the figure is how many
                errors += 1
                print(f"{way}: a worker failed: {type(error).__name__}: {error}", file=sys.stderr)
    wall = time.time() - started
    done.set()
    poller.join()
    if proxy is not None:
        proxy.kill()
    study = optuna.load_study(study_name=STUDY, storage=url)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    timed = [t for trials in per_worker for t in trials]
    after, before = steady_window([end for _, end, _ in trials] for trials in per_worker)
    everything = [s for _, _, s in timed]
    steady = [s for start, end, s in timed if start >= after and end <= before]
    return {
        "way": way,
        "workers": args.workers,
        "finished_trials": len(timed),
        "not_complete_at_end": sum(s != optuna.trial.TrialState.COMPLETE for s in states),
        "wall_seconds": round(wall, 1),
        "trials_per_minute": round(60 * len(timed) / wall, 1),
        "storage_seconds_p50": quantile(everything, 0.5),
        "storage_seconds_p99": quantile(everything, 0.99),
        "steady_trials": len(steady),
        "steady_storage_seconds_p50": quantile(steady, 0.5) if steady else None,
        "steady_storage_seconds_p99": quantile(steady, 0.99) if steady else None,
        "steady_storage_seconds_mean": round(statistics.mean(steady), 3) if steady else None,
        "peak_postgres_connections": peak[0],
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--trials-per-worker", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--epoch-seconds", type=float, default=2.0, help="mean sleep per epoch")
    parser.add_argument("--name", default="storage_proxy")
    args = parser.parse_args()
    postgres = start_postgres()
    try:
        rows = [measure(way, postgres, args) for way in ("direct", "grpc")]
    finally:
        postgres.stop()
    for row in rows:
        print(json.dumps(row))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps(
            {
                "benchmark": "storage_proxy",
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {multiprocessing.cpu_count()} cores",
                "optuna": optuna.__version__,
                "epochs": args.epochs,
                "epoch_seconds_mean": args.epoch_seconds,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()

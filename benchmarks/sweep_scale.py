"""Benchmark: sweep coordination with 1, 8, 32 and more workers on one PostgreSQL and one MLflow
server, training replaced by a stand-in.

Each worker is the real `python -m pipeline.tune` code path (Optuna storage with its retries and
heartbeats, the MLflow parent run and one nested run per trial, the retry and settle logic),
except that the trial's process is replaced, in this benchmark only, by a stand-in in the worker
that sleeps a drawn time per epoch, logs each epoch to the trial's MLflow run as a trial process
does, and reports a drawn validation accuracy. Per worker count it writes:

- trials per minute (finished trials over the sweep's wall time, first worker start to last end);
- coordination seconds per trial, p50 and p99: a trial's time in Optuna (start to finish) less
  the stand-in's own sleep, i.e. everything that is not training; over all trials, and over the
  steady state: the trials that started after every worker had finished its first trial and
  ended before any worker ran out of trials (every worker here shares this machine's cores, so
  the others' start, about 10 s of imports each, and end, drawing the study's plots, starve the
  trials beside them; on a cluster each worker has its own machine);
- peak PostgreSQL connections (to the study's database, and in all), polled every 0.25 s (the
  throwaway cluster allows 200, max_connections; a poll refused there is counted);
- MLflow requests per second (counted in each worker's MLflow client);
- errors (tracebacks in the workers' output), lost trials (RUNNING or WAITING at the end, or a
  finished trial without exactly one FINISHED run) and duplicated ones (two runs for a trial).
- CPU seconds per finished trial of the workers, the MLflow server, PostgreSQL and PgBouncer
  (every process shares this machine's cores, so this says where they went);
- parent runs in the sweep's MLflow experiment (1: every worker chose the same one) and trial
  runs nested under any run that is not one of them.

The study keeps params.yaml's heartbeat and grace period (30 s, 120 s), as a real sweep does.
`--epoch-seconds LOW HIGH` is the range of the stand-in's drawn sleep per epoch (0.2-0.6 s by
default; a real epoch of this network takes seconds on a GPU, minutes on a CPU).
`--mlflow-workers N` starts the MLflow server with N workers, each with a database pool of 20 +
20 connections (MLFLOW_SQLALCHEMYSTORE_POOL_SIZE, MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW).

    python benchmarks/sweep_scale.py --workers 1 8 32 64 --trials-per-worker 3

Writes benchmarks/results/sweep_scale.json. With `--pgbouncer 20` the workers reach the study's
database through PgBouncer (transaction pooling, at most 20 server connections per database) and
the figures go to benchmarks/results/sweep_scale_pgbouncer.json (or --name).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.figures import quantile, steady_window  # noqa: E402
from tests.helpers import (  # noqa: E402 - the tests' own server and data helpers
    STUDY,
    SWEEP,
    copy_project,
    free_port,
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
COUNT_FILE_ENV = "SWEEP_SCALE_COUNTS"  # where a worker writes its MLflow request count
EPOCH_SECONDS_ENV = "SWEEP_SCALE_EPOCH_SECONDS"  # the stand-in's sleep per epoch: "LOW HIGH"


def worker() -> None:
    """One sweep worker, `pipeline.tune.main`, with the stand-in for the trial's process."""
    from pipeline import tracking, tune
    from pipeline.stage_runner import run_stage
    from pipeline.trial_process import Epoch, TrialJob, TrialOutcome

    # After the pipeline, as `python -m pipeline.tune` imports them: it sets MLflow's environment.
    rest_utils = importlib.import_module("mlflow.utils.rest_utils")

    requests = [0]
    send = rest_utils.http_request

    def counted(*args: Any, **kwargs: Any) -> Any:
        requests[0] += 1
        return send(*args, **kwargs)

    rest_utils.http_request = counted
    rng = random.Random(os.getpid())
    low, high = map(float, os.environ[EPOCH_SECONDS_ENV].split())

    def stand_in(job: TrialJob, judge: Any, started: Any) -> TrialOutcome:
        started(os.getpid())
        slept, value = 0.0, 0.0
        for epoch in range(1, job.params.train.epochs + 1):
            seconds = rng.uniform(low, high)
            time.sleep(seconds)
            slept += seconds
            value = rng.uniform(0.1, 0.9)
            logs = {"loss": 1.0, "accuracy": value, "val_loss": 1.0, "val_accuracy": value}
            tracking.log_epoch(epoch, logs, job.run_id)
            if judge(Epoch(epoch, value)):
                return TrialOutcome("pruned", reason="pruned", fit_seconds=slept)
        return TrialOutcome("complete", value=value, fit_seconds=slept)

    tune.run_in_process = stand_in  # type: ignore[assignment]
    try:
        run_stage(tune.main)
    finally:
        Path(os.environ[COUNT_FILE_ENV]).write_text(str(requests[0]))


def connections(connection: Any, database: str | None) -> int:
    """Open connections to `database` (None: to any database), as pg_stat_activity says."""
    where = "datname is not null" if database is None else f"datname = '{database}'"
    (count,) = connection.execute(f"select count(*) from pg_stat_activity where {where}").fetchone()
    return int(count)


def cpu_seconds(pid: int) -> float:
    """CPU seconds of a server process and its children, live or ended (a PostgreSQL backend
    that closed its connection counts in its postmaster's children times)."""
    import psutil

    process = psutil.Process(pid)
    times = process.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in process.children(recursive=True):
        try:
            child_times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += child_times.user + child_times.system
    return total


def server_pids(postgres: Any, server: Any, bouncer: Any) -> dict[str, int]:
    """The processes whose CPU the benchmark reports beside the workers'."""
    postmaster = int((postgres.base / "data" / "postmaster.pid").read_text().split()[0])
    pids = {"mlflow_server": server.process.pid, "postgres": postmaster}
    if bouncer is not None:
        pids["pgbouncer"] = bouncer.pid
    return pids


def start_pgbouncer(postgres: Any, pool_size: int) -> tuple[subprocess.Popen[bytes], int]:
    """PgBouncer before `postgres` in transaction pooling: each database gets at most
    `pool_size` server connections, however many clients connect. Returns it and its port."""
    import psycopg

    base, port = postgres.base / "pgbouncer", free_port()
    base.mkdir()
    (base / "users.txt").write_text(f'"{postgres.user}" "{postgres.password}"\n')
    (base / "pgbouncer.ini").write_text(
        f"[databases]\n* = host={postgres.host} port={postgres.port}\n\n[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = scram-sha-256\nauth_file = {base / 'users.txt'}\n"
        f"pool_mode = transaction\ndefault_pool_size = {pool_size}\nmax_client_conn = 4000\n"
        "log_connections = 0\nlog_disconnections = 0\n"
    )
    if postgres.as_user:  # PgBouncer, like PostgreSQL, refuses to run as root
        for path in (base, base / "users.txt", base / "pgbouncer.ini"):
            shutil.chown(path, "postgres", "postgres")
    process = subprocess.Popen([*postgres.as_user, "pgbouncer", str(base / "pgbouncer.ini")])
    url = postgres.url("postgres").replace(f":{postgres.port}/", f":{port}/")
    for _ in range(100):
        try:
            psycopg.connect(url, prepare_threshold=None).close()
            return process, port
        except psycopg.OperationalError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"PgBouncer did not accept connections on port {port} within 10 s")


def measure(
    postgres: Any,
    server: Any,
    project: Path,
    workers: int,
    trials: int,
    port: int | None,
    pids: dict[str, int],
    epoch_seconds: list[float],
) -> dict[str, Any]:
    """One sweep of `workers` workers to `trials` trials; `port`: PgBouncer's, or None.
    `pids`: the servers whose CPU seconds to report, by name; `epoch_seconds`: the stand-in's
    range of sleep per epoch."""
    import optuna

    database = f"scale_{workers}"
    storage = postgres.create_database(database)
    if port is not None:
        storage = storage.replace(f":{postgres.port}/", f":{port}/")
        # Optuna creates its tables in a transaction that takes a second connection: many workers
        # creating them at once through a full pool wait on each other. As sweep/README says,
        # the study is created once, then the workers start.
        create = [str(Path(sys.executable).parent / "optuna"), "create-study", "--storage",
                  storage, "--study-name", STUDY, "--direction", "maximize"]  # fmt: skip
        subprocess.run(create, check=True, capture_output=True)
    experiment = f"scale-{workers}"
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["mlflow"]["experiment"] = experiment
    params["tune"].update(n_trials=trials)
    write_params(project, params)
    counts = Path(tempfile.mkdtemp(prefix="scale-counts-"))
    env = run_env(
        OPTUNA_STORAGE=storage, MLFLOW_TRACKING_URI=server.url, **server.credentials(),
        **{EPOCH_SECONDS_ENV: " ".join(map(str, epoch_seconds))},
    )  # fmt: skip

    peaks = {"study": 0, "all": 0}
    done = threading.Event()

    def poll() -> None:
        # One connection for the whole sweep (a new one per poll costs PostgreSQL a backend
        # each time, and would count in its CPU seconds), opened again if it is lost.
        import psycopg

        connection = None
        while not done.is_set():
            try:
                connection = connection or psycopg.connect(
                    postgres.url("postgres"), autocommit=True
                )
                peaks["study"] = max(peaks["study"], connections(connection, database))
                peaks["all"] = max(peaks["all"], connections(connection, None))
            except psycopg.OperationalError:  # "too many clients": max_connections is reached
                peaks["refused"] = peaks.get("refused", 0) + 1
                connection = None
            time.sleep(0.25)
        if connection is not None:
            connection.close()

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    workers_cpu = children.ru_utime + children.ru_stime
    started = time.monotonic()
    processes = []
    for number in range(workers):
        count_file = {COUNT_FILE_ENV: str(counts / f"{number}.txt")}
        processes.append(
            subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--worker"],
                cwd=project,
                env={**env, **count_file},
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    outputs = [p.communicate(timeout=3600)[0] for p in processes]
    wall = time.monotonic() - started
    done.set()
    poller.join()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {"workers": children.ru_utime + children.ru_stime - workers_cpu}
    cpu |= {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}

    study = optuna.load_study(study_name=STUDY, storage=storage)
    trials_ = study.get_trials()
    State = optuna.trial.TrialState
    finished = [t for t in trials_ if t.state in (State.COMPLETE, State.PRUNED)]

    def coordination_of(trial: optuna.trial.FrozenTrial) -> float:
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        return float(seconds - trial.user_attrs["fit"]["seconds"])

    coordination = [coordination_of(t) for t in finished]
    # Steady state: after every worker's first trial ended, before any worker's last one did.
    by_worker: dict[str, list[Any]] = {}
    for trial in finished:
        by_worker.setdefault(trial.user_attrs["worker"], []).append(trial.datetime_complete)
    after, before = steady_window(by_worker.values())
    steady = [
        coordination_of(t) for t in finished
        if t.datetime_start >= after and t.datetime_complete <= before
    ]  # fmt: skip
    client = server.client()
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=50_000)
    finished_runs: dict[str, int] = {}
    for run_ in runs:
        if "mlflow.parentRunId" in run_.data.tags and run_.info.status == "FINISHED":
            finished_runs[run_.info.run_name] = finished_runs.get(run_.info.run_name, 0) + 1
    lost = [t.number for t in trials_ if t.state in (State.RUNNING, State.WAITING)]
    lost += [t.number for t in finished if finished_runs.get(f"trial-{t.number}", 0) == 0]
    duplicated = [name for name, count in finished_runs.items() if count > 1]
    parents = {r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags}
    nested_under = {r.data.tags.get("mlflow.parentRunId") for r in runs} - {None}
    requests = sum(int(f.read_text()) for f in counts.glob("*.txt"))

    return {
        "workers": workers,
        "n_trials": trials,
        "finished_trials": len(finished),
        "all_trials": len(trials_),
        "wall_seconds": round(wall, 1),
        "trials_per_minute": round(60 * len(finished) / wall, 1),
        "coordination_seconds_p50": quantile(coordination, 0.5),
        "coordination_seconds_p99": quantile(coordination, 0.99),
        "steady_trials": len(steady),
        "steady_coordination_seconds_p50": quantile(steady, 0.5) if steady else None,
        "steady_coordination_seconds_p99": quantile(steady, 0.99) if steady else None,
        "epoch_seconds": epoch_seconds,
        "stand_in_seconds_mean": round(
            statistics.mean(t.user_attrs["fit"]["seconds"] for t in finished), 3
        ),
        "peak_postgres_connections_study": peaks["study"],
        "peak_postgres_connections_all": peaks["all"],
        "polls_refused_at_max_connections": peaks.get("refused", 0),
        # Per finished trial, each worker's start and end included: where the 2 cores went.
        "cpu_seconds_per_trial": {
            name: round(seconds / max(len(finished), 1), 2) for name, seconds in cpu.items()
        },
        "mlflow_requests": requests,
        "mlflow_requests_per_second": round(requests / wall, 1),
        "worker_exit_codes": sorted({p.returncode for p in processes}),
        "errors": sum("Traceback" in output for output in outputs),
        "first_error": next(
            (
                output[output.index("Traceback") :][-1500:]
                for output in outputs
                if "Traceback" in output
            ),
            None,
        ),
        "failed_workers_last_lines": [
            output.strip().splitlines()[-1][-300:]
            for output, p in zip(outputs, processes, strict=True)
            if p.returncode != 0 and output.strip()
        ],
        "lost_trials": lost,
        "duplicated_trials": duplicated,
        "parent_runs": len(parents),  # 1: every worker chose the same parent
        "trial_runs_nested_under_other_runs": len(nested_under - parents),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--trials-per-worker", type=int, default=3)
    parser.add_argument("--pgbouncer", type=int, metavar="POOL_SIZE", help="through PgBouncer")
    parser.add_argument(
        "--epoch-seconds",
        type=float,
        nargs=2,
        default=[0.2, 0.6],
        metavar=("LOW", "HIGH"),
        help="the stand-in's drawn sleep per epoch",
    )
    parser.add_argument("--mlflow-workers", type=int, default=1, help="the MLflow server's")
    parser.add_argument("--name", help="results/<name>.json (default: by --pgbouncer)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker()
        return

    postgres = start_postgres()
    bouncer, port = start_pgbouncer(postgres, args.pgbouncer) if args.pgbouncer else (None, None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        # With more server workers, each gets a database pool of 20 + 20 (sweep/README, item 2).
        pool = {
            "MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "20",
            "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "20",
        }
        server = start_mlflow_server(
            postgres.create_database("mlflow"), tmp_path / "artifacts", args.mlflow_workers,
            **(pool if args.mlflow_workers > 1 else {}),
        )  # fmt: skip
        try:
            archive = write_python_archive(tmp_path / "cifar.tar.gz", make_tiny_cifar())
            project = copy_project(tmp_path / "project")
            # The shipped heartbeat and grace period (not the tests' 1 s and 3 s): each
            # heartbeat is a write, and a real sweep makes those.
            shipped = yaml.safe_load((ROOT / "params.yaml").read_text())["tune"]
            liveness = {key: shipped[key] for key in ("heartbeat_seconds", "grace_seconds")}
            tune = {**SWEEP, "epochs": 3, "pruner": "none", **liveness}
            params = tiny_params(archive, tune=tune)
            write_params(project, params)
            prepared = run(["dvc", "repro", "preprocess"], project, CIFAR10_URL=str(archive))
            assert prepared.returncode == 0, prepared.stderr
            rows = []
            for workers in args.workers:
                trials = workers * args.trials_per_worker
                pids = server_pids(postgres, server, bouncer)
                row = measure(
                    postgres, server, project, workers, trials, port, pids, args.epoch_seconds
                )
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            server.stop()
            if bouncer is not None:
                bouncer.terminate()
                bouncer.wait()
            postgres.stop()
    RESULTS.mkdir(exist_ok=True)
    report = {
        "benchmark": "sweep_scale",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "mlflow_server_workers": args.mlflow_workers,
        "pgbouncer_pool_size": args.pgbouncer,
        "heartbeat_seconds": liveness["heartbeat_seconds"],
        "rows": rows,
    }
    name = args.name or ("sweep_scale_pgbouncer" if args.pgbouncer else "sweep_scale")
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

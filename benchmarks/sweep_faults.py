"""Benchmark: shared sweeps under injected faults, against the same sweep without faults.

Starts a throwaway PostgreSQL cluster (password authentication; as the `postgres` user when run
as root) and an `mlflow server --app-name basic-auth` backed by it, prepares the real CIFAR-10 in
a fresh project copy, then runs rounds of a small real-data sweep with 3 workers
(`python -m pipeline.tune`, as a user starts them). Each round injects, at times drawn from the
round's seed, one of each fault in a random order: SIGKILL a worker, SIGKILL a trial process,
restart the MLflow server (down for a few seconds), restart PostgreSQL (`pg_ctl restart -m fast`).

Reports: rounds that ended by themselves out of R; trials lost (finished trials whose Optuna or
MLflow record is missing or wrong: no single FINISHED child run with the trial's state and every
epoch logged once, or any run left RUNNING); the median completion time against the no-fault
rounds. Goal: R of R, none lost, median within the no-fault median plus one grace period.

    python benchmarks/sweep_faults.py --rounds 10

Writes benchmarks/results/sweep_faults.json (or `--name NAME`: NAME.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.accuracy import machine  # noqa: E402
from tests.helpers import (  # noqa: E402 - the tests' servers and project copy
    MlflowServer,
    Postgres,
    copy_project,
    run,
    run_env,
    start_mlflow_server,
    start_postgres,
)

RESULTS = Path(__file__).parent / "results"
WORKERS = 3
# Faults land between these seconds after the workers start: a clean round takes about 35 s here,
# the first 10 of them starting up (TensorFlow's import, the study, the parent run).
FAULTS_FROM, FAULTS_UNTIL = 8, 30
ROUND_LIMIT = 900  # seconds: a round still running then did not end by itself
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
TUNE = {  # a small real-data sweep: 6 trials of 2 epochs on 2% of the training split
    "n_trials": 6, "epochs": 2, "train_fraction": 0.02, "pruner": "none",
    "heartbeat_seconds": 2, "grace_seconds": 10, "connect_seconds": 60,
}  # fmt: skip


def prepare(project: Path, archive: Path, precision: str | None) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tune"].update(TUNE)
    if precision:  # float32 where bfloat16 is emulated (8x slower on AVX2)
        params["train"]["precision"] = precision
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run(["dvc", "repro", "preprocess"], project, CIFAR10_URL=str(archive))
    assert result.returncode == 0, result.stderr[-3000:]


def inject(
    fault: str, after: float, workers: list[subprocess.Popen[str]], storage: str,
    server: MlflowServer, postgres: Postgres, study: str, log: list[str],
) -> None:  # fmt: skip
    """Waits `after` seconds, then injects one fault (a thread per fault)."""
    time.sleep(after)
    if fault == "kill_worker":
        alive = [w for w in workers if w.poll() is None]
        if alive:
            os.kill(alive[0].pid, signal.SIGKILL)
    elif fault == "kill_trial_process":
        try:
            trials = optuna.load_study(study_name=study, storage=storage).get_trials()
        except Exception as error:  # the study may not exist yet, or the database be restarting
            log.append(f"{after:.0f}s {fault}: no study ({type(error).__name__})")
            return
        running = [t for t in trials if t.state.name == "RUNNING" and "process" in t.user_attrs]
        if running:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.kill(running[0].user_attrs["process"], signal.SIGKILL)
    elif fault == "restart_mlflow":
        server.restart_after(5)
    elif fault == "restart_postgres":
        postgres.restart()
    log.append(f"{after:.0f}s {fault}")


def audit(storage: str, study: str, client: Any, experiment: str) -> dict[str, Any]:
    """Counts the finished trials whose Optuna or MLflow record is missing or wrong."""
    trials = optuna.load_study(study_name=study, storage=storage).get_trials()
    finished = [t for t in trials if t.state in FINISHED]
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              max_results=1000)  # fmt: skip
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    lost = 0
    for trial in finished:
        mine = [r for r in children if r.info.run_name == f"trial-{trial.number}"
                and r.info.status == "FINISHED"]  # fmt: skip
        steps = (
            sorted(m.step for m in client.get_metric_history(mine[0].info.run_id, "val_accuracy"))
            if len(mine) == 1 else []
        )  # fmt: skip
        if (
            len(mine) != 1
            or mine[0].info.run_id != trial.user_attrs.get("mlflow_run_id")
            or mine[0].data.tags.get("optuna.state") != trial.state.name
            or steps != list(range(1, len(trial.intermediate_values) + 1))
        ):
            lost += 1
    return {
        "finished": len(finished),
        "states": {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "FAIL")},
        "stuck": sum(t.state.name in ("RUNNING", "WAITING") for t in trials),
        "parents": sum("mlflow.parentRunId" not in r.data.tags for r in runs),
        "runs_left_running": sum(r.info.status == "RUNNING" for r in runs),
        "lost": lost,
    }


def one_round(
    index: int, faults: bool, seed: int, project: Path, postgres: Postgres, server: MlflowServer,
    client: Any,
) -> dict[str, Any]:  # fmt: skip
    name = f"{'faults' if faults else 'clean'}_{index}"
    storage = postgres.create_database(name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tune"]["study_name"] = name
    params["mlflow"]["experiment"] = f"bench-{name}-{seed}"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = run_env(OPTUNA_STORAGE=storage, MLFLOW_TRACKING_URI=server.url, **server.credentials())
    started = time.perf_counter()
    workers = [
        subprocess.Popen(["python", "-m", "pipeline.tune"], cwd=project, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
        for _ in range(WORKERS)
    ]  # fmt: skip
    injected: list[str] = []
    threads = []
    if faults:
        rng = random.Random(seed)
        kinds = ["kill_worker", "kill_trial_process", "restart_mlflow", "restart_postgres"]
        rng.shuffle(kinds)
        times = sorted(rng.uniform(FAULTS_FROM, FAULTS_UNTIL) for _ in kinds)
        for kind, after in zip(kinds, times, strict=True):
            thread = threading.Thread(
                target=inject, daemon=True,
                args=(kind, after, workers, storage, server, postgres, name, injected),
            )  # fmt: skip
            thread.start()
            threads.append(thread)
    outputs = []
    ended = True
    for worker in workers:
        try:
            left = max(1.0, ROUND_LIMIT - (time.perf_counter() - started))
            outputs.append(worker.communicate(timeout=left)[0])
        except subprocess.TimeoutExpired:
            ended = False
            os.killpg(worker.pid, signal.SIGKILL)
            outputs.append(worker.communicate()[0])
    seconds = time.perf_counter() - started
    for thread in threads:
        thread.join()
    record = audit(storage, name, client, params["mlflow"]["experiment"])
    record.update(
        round=name, seed=seed, ended_by_itself=ended, seconds=round(seconds, 1),
        exit_codes=[w.returncode for w in workers], faults=injected,
        tracebacks=sum("Traceback" in out for out in outputs),
    )  # fmt: skip
    print(json.dumps(record), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clean-rounds", type=int, default=3, help="rounds without faults")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--archive", type=Path, default=ROOT.parent / "shared/data/cifar-10-python.tar.gz"
    )
    parser.add_argument("--name", default="sweep_faults", help="results/<name>.json")
    parser.add_argument(
        "--precision", choices=["float32", "mixed_bfloat16"], help="default: params.yaml's"
    )
    args = parser.parse_args()

    postgres = start_postgres()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_mlflow_server(postgres.create_database("mlflow"), Path(tmp) / "artifacts")
        client = server.client()
        try:
            project = copy_project(Path(tmp) / "project")
            prepare(project, args.archive, args.precision)
            clean, faulty = [], []
            for i in range(args.rounds):  # alternated, so both kinds see the same machine load
                if i < args.clean_rounds:
                    clean.append(
                        one_round(i, False, args.seed + i, project, postgres, server, client)
                    )
                faulty.append(one_round(i, True, args.seed + i, project, postgres, server, client))
        finally:
            server.stop()
            postgres.stop()

    clean_median = statistics.median(r["seconds"] for r in clean)
    faulty_median = statistics.median(r["seconds"] for r in faulty)
    report = {
        "benchmark": "shared sweeps under faults (3 workers, PostgreSQL, MLflow basic-auth)",
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "sweep": TUNE,
        "precision": args.precision or "params.yaml's",
        "rounds": args.rounds,
        "ended_by_themselves": sum(r["ended_by_itself"] for r in faulty),
        "trials_lost": sum(r["lost"] for r in faulty),
        "runs_left_running": sum(r["runs_left_running"] for r in faulty),
        "median_seconds_with_faults": faulty_median,
        "median_seconds_without_faults": clean_median,
        "goal_seconds": clean_median + TUNE["grace_seconds"],
        "goal_met": (
            all(r["ended_by_itself"] for r in faulty)
            and not any(r["lost"] or r["runs_left_running"] or r["stuck"] for r in faulty)
            and faulty_median <= clean_median + TUNE["grace_seconds"]
        ),
        "clean_rounds": clean,
        "fault_rounds": faulty,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if "rounds" not in k}, indent=2))


if __name__ == "__main__":
    main()

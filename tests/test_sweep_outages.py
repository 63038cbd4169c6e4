"""Sweeps that survive their services: PostgreSQL restarted, the MLflow server away for a while
and for too long, and bad credentials, with the checks of fault_sweeps.Sweep.check."""

from __future__ import annotations

from collections.abc import Callable

import optuna
import pytest

from tests.fault_sweeps import Sweep, describe
from tests.helpers import STUDY, MlflowServer, Postgres

pytestmark = pytest.mark.slow


def test_postgres_restarted_mid_sweep(
    fault_sweep: Callable[..., Sweep], postgres: Postgres
) -> None:
    sweep = fault_sweep()
    sweep.start(3)
    sweep.in_fit()
    postgres.restart()
    outputs = sweep.finish()
    assert all(worker.returncode == 0 for worker in sweep.workers), outputs
    sweep.check(workers=3)


def test_the_mlflow_server_away_for_15_seconds(
    fault_sweep: Callable[..., Sweep], mlflow_server: MlflowServer
) -> None:
    sweep = fault_sweep(n_trials=4, epochs=6)
    sweep.start(3)
    sweep.in_fit()
    mlflow_server.restart_after(15)
    outputs = sweep.finish()
    assert all(worker.returncode == 0 for worker in sweep.workers), outputs
    sweep.check(workers=3)


def test_the_mlflow_server_away_too_long_stops_workers_in_one_line(
    fault_sweep: Callable[..., Sweep], mlflow_server: MlflowServer
) -> None:
    sweep = fault_sweep(n_trials=4, epochs=6, connect_seconds=4)
    sweep.start(3)
    sweep.in_fit()
    mlflow_server.restart_after(30)
    outputs = sweep.finish()
    stopped = [out for worker, out in zip(sweep.workers, outputs.values(), strict=True)
               if worker.returncode != 0]  # fmt: skip
    assert stopped, "no worker noticed the outage"
    for output in stopped:
        assert f"MLflow tracking store {mlflow_server.url}" in output, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
    # The trials it cut short are failed and queued; one worker with the server back runs them.
    (again,) = sweep.start(1)
    output = sweep.finish([again])[again.pid]
    assert again.returncode == 0 and "running trials" in output, output[-3000:]
    trials = sweep.check(workers=4)
    cut = {t.number for t in trials if t.state == optuna.trial.TrialState.FAIL}
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
    assert cut and cut <= {retried(t) for t in trials}, describe(trials)


def test_bad_credentials_are_refused_in_one_line_and_store_nothing(
    fault_sweep: Callable[..., Sweep], mlflow_server: MlflowServer, postgres: Postgres
) -> None:
    sweep = fault_sweep(n_trials=2, epochs=1)
    for credentials, who in (
        ({"MLFLOW_TRACKING_USERNAME": "", "MLFLOW_TRACKING_PASSWORD": ""}, "without credentials"),
        ({"MLFLOW_TRACKING_PASSWORD": "wrong"}, f"user {mlflow_server.user!r}"),
    ):
        (worker,) = sweep.start(1, **credentials)
        output = sweep.finish([worker])[worker.pid]
        assert worker.returncode == 1, output[-3000:]
        assert f"MLflow tracking server {mlflow_server.url} refused" in output and who in output
        assert "HTTP 401" in output and "Traceback" not in output
        assert STUDY not in optuna.get_all_study_names(sweep.storage)  # nothing stored
    # A worker with the right credentials is not blocked by the refused ones.
    (worker,) = sweep.start(1)
    output = sweep.finish([worker])[worker.pid]
    assert worker.returncode == 0, output[-3000:]
    sweep.check(workers=1)
    # No password in the logs, the MLflow record or the trials table.
    secrets = (mlflow_server.password, postgres.password)
    experiment = sweep.client.get_experiment_by_name(sweep.experiment)
    for run in sweep.client.search_runs([experiment.experiment_id]):
        recorded = [*run.data.params.values(), *run.data.tags.values()]
        assert not [value for value in recorded if any(s in value for s in secrets)]
    table = (sweep.project / "sweep/trials.csv").read_text()
    assert not [s for s in secrets if s in output or s in table]

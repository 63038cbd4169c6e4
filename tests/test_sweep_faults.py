"""Sweeps that survive faults: three workers on PostgreSQL and an MLflow server with basic auth,
and one fault each (a worker killed at three points, a trial process killed, PostgreSQL
restarted, the MLflow server away for a while and for too long, SIGTERM, bad credentials), then
the same checks: the sweep ends by itself, with n to n + workers - 1 finished trials, unique
numbers, nothing RUNNING or WAITING, and exactly one FINISHED MLflow child run per finished trial,
every epoch logged once, under the study's single parent run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import psutil
import pytest
import yaml

from tests.helpers import MlflowServer, Postgres, run_env
from tests.test_tune import STUDY, sweep_project

pytestmark = pytest.mark.slow
State = optuna.trial.TrialState
FINISHED = (State.COMPLETE, State.PRUNED)
# Small and quick, with heartbeats fast enough to see a dead worker's trial failed in seconds.
FAULT_SWEEP = {"n_trials": 5, "epochs": 4, "pruner": "none", "heartbeat_seconds": 1,
               "grace_seconds": 4, "connect_seconds": 60}  # fmt: skip
ENDS_WITHIN = 300  # seconds: every sweep here ends by itself well inside this


@dataclass
class Sweep:
    project: Path
    env: dict[str, str]
    storage: str
    experiment: str
    client: Any
    n_trials: int
    workers: list[subprocess.Popen[str]] = field(default_factory=list)

    def start(self, count: int = 1, **extra: str) -> list[subprocess.Popen[str]]:
        started = [
            subprocess.Popen(
                ["python", "-m", "pipeline.tune"],
                cwd=self.project,
                env=run_env(**{**self.env, **extra}),
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            for _ in range(count)
        ]
        self.workers += started
        return started

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        try:
            return optuna.load_study(study_name=STUDY, storage=self.storage).get_trials()
        except KeyError:  # not created yet
            return []

    def wait_for(
        self, found: Callable[[optuna.trial.FrozenTrial], bool], what: str
    ) -> optuna.trial.FrozenTrial:
        """Polls the study until a trial matches."""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            for trial in self.trials():
                if found(trial):
                    return trial
            time.sleep(0.2)
        raise AssertionError(f"no trial {what} within 240 s")

    def in_fit(self) -> optuna.trial.FrozenTrial:
        """Polls until a running trial has reported an epoch: it is in the middle of `fit`."""
        return self.wait_for(
            lambda t: t.state == State.RUNNING and (t.user_attrs.get("epochs") or 0) >= 1,
            "in its second epoch",
        )

    def worker_of(self, trial: optuna.trial.FrozenTrial) -> subprocess.Popen[str]:
        pid = int(trial.user_attrs["worker"].rsplit(":", 1)[1])
        return next(w for w in self.workers if w.pid == pid)

    def finish(self, workers: list[subprocess.Popen[str]] | None = None) -> dict[int, str]:
        """Waits for the workers to end by themselves; returns their output by pid. Whatever
        happened, no worker (or trial process) printed a traceback."""
        outputs = {}
        for worker in workers if workers is not None else self.workers:
            outputs[worker.pid] = worker.communicate(timeout=ENDS_WITHIN)[0]
            assert "Traceback" not in outputs[worker.pid], outputs[worker.pid][-4000:]
        return outputs

    def check(self, workers: int) -> list[optuna.trial.FrozenTrial]:
        """The invariants every sweep keeps, whatever happened to it."""
        trials = self.trials()
        finished = [t for t in trials if t.state in FINISHED]
        assert self.n_trials <= len(finished) <= self.n_trials + workers - 1, describe(trials)
        assert len({t.number for t in trials}) == len(trials)
        assert not [t for t in trials if t.state in (State.RUNNING, State.WAITING)], describe(
            trials
        )
        experiment = self.client.get_experiment_by_name(self.experiment)
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        runs = self.client.search_runs([experiment.experiment_id], max_results=1000)
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(parents) == 1, [p.info.run_name for p in parents]
        assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
        assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
        good = [c for c in children if c.info.status == "FINISHED"]
        assert sorted(c.info.run_name for c in good) == sorted(
            f"trial-{t.number}" for t in finished
        )
        by_id = {c.info.run_id: c for c in good}
        for trial in finished:
            run_id = trial.user_attrs["mlflow_run_id"]
            assert by_id[run_id].data.tags["optuna.state"] == trial.state.name
            history = self.client.get_metric_history(run_id, "val_accuracy")
            assert sorted(m.step for m in history) == list(range(1, trial.user_attrs["epochs"] + 1))
        for trial in trials:
            if trial.state == State.FAIL and trial.user_attrs.get("mlflow_run_id"):
                run = self.client.get_run(trial.user_attrs["mlflow_run_id"])
                assert run.info.status in ("FAILED", "KILLED"), trial.number
        return trials

    def retried(self, number: int) -> optuna.trial.FrozenTrial:
        trials = self.trials()
        (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == number]
        assert retry.state in FINISHED and retry.params == trials[number].params
        return retry


def describe(trials: list[optuna.trial.FrozenTrial]) -> list[tuple[int, str]]:
    return [(t.number, t.state.name) for t in trials]


@pytest.fixture
def shared(tmp_path: Path, postgres: Postgres, mlflow_server: MlflowServer) -> Callable[..., Sweep]:
    """A tiny sweep on a fresh PostgreSQL database and its own experiment on the MLflow server."""

    def make(**tune: Any) -> Sweep:
        tune = {**FAULT_SWEEP, **tune}
        project, env = sweep_project(tmp_path, own_mlflow=False, **tune)
        params = yaml.safe_load((project / "params.yaml").read_text())
        experiment = f"faults-{tmp_path.name}"
        params["mlflow"]["experiment"] = experiment
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        storage = postgres.create_database(tmp_path.name.lower().replace("-", "_"))
        env.update(
            OPTUNA_STORAGE=storage, MLFLOW_TRACKING_URI=mlflow_server.url,
            **mlflow_server.credentials(),
        )  # fmt: skip
        return Sweep(project, env, storage, experiment, mlflow_server.client(), tune["n_trials"])

    return make


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_a_worker_and_check(
    sweep: Sweep, victim: subprocess.Popen[str], doomed: int, others: int = 0
) -> str:
    """SIGKILLs the worker alone; the others (`others` more started once its trial is stale) fail
    its trial, retry it, and finish. Returns what the victim (and its trial process) printed."""
    trial_process = sweep.trials()[doomed].user_attrs.get("process")
    os.kill(victim.pid, signal.SIGKILL)
    if trial_process:  # it hears its worker die and stops at once
        deadline = time.monotonic() + 10
        while not gone(trial_process):
            assert time.monotonic() < deadline, "the dead worker's trial process trains on"
            time.sleep(0.1)
    if others:
        time.sleep(FAULT_SWEEP["grace_seconds"] + 2 * FAULT_SWEEP["heartbeat_seconds"])
        sweep.start(others)
    outputs = sweep.finish()
    victim_output = outputs.pop(victim.pid)
    assert "Traceback" not in victim_output, victim_output[-3000:]
    assert all(worker.returncode == 0 for worker in sweep.workers if worker is not victim), outputs
    trials = sweep.check(workers=3)
    assert trials[doomed].state == State.FAIL
    sweep.retried(doomed)
    return victim_output


def test_a_worker_killed_as_its_trial_starts(shared: Callable[..., Sweep]) -> None:
    sweep = shared()
    (victim,) = sweep.start(1, PIPELINE_TEST_PAUSE="start=60")  # holds its first trial there
    sweep.start(2)
    doomed = sweep.wait_for(
        lambda t: t.state == State.RUNNING and "mlflow_run_id" in t.user_attrs
        and t.user_attrs["worker"].endswith(f":{victim.pid}"),
        "held by the pausing worker",
    )  # fmt: skip
    assert "process" not in doomed.user_attrs  # no training has started
    kill_a_worker_and_check(sweep, victim, doomed.number)


def test_a_worker_killed_during_fit(shared: Callable[..., Sweep]) -> None:
    # A tiny epoch takes under half a second: with 4 epochs a busy machine could let the trial
    # finish between the poll that sees it in fit and the kill.
    sweep = shared(epochs=12)
    sweep.start(3)
    doomed = sweep.in_fit()
    victim = sweep.worker_of(doomed)
    output = kill_a_worker_and_check(sweep, victim, doomed.number)
    assert output.count("its sweep worker is gone; the trial stops") == 1, output[-3000:]


def test_a_worker_killed_between_fit_and_storing_the_result(shared: Callable[..., Sweep]) -> None:
    """The others start once the dead worker's trial is stale. Started together with it, they
    could reach n_trials before any of them looked for stale trials again; the sweep is then
    rightly full and the lost trial is not retried, so the retry would be down to timing."""
    sweep = shared()
    (victim,) = sweep.start(1, PIPELINE_TEST_PAUSE="store=60")
    doomed = sweep.wait_for(
        lambda t: t.state == State.RUNNING and "fit_seconds" in t.user_attrs,
        "trained and not yet stored",
    )  # fmt: skip
    kill_a_worker_and_check(sweep, victim, doomed.number, others=2)


def test_a_killed_trial_process_fails_its_trial_and_the_worker_goes_on(
    shared: Callable[..., Sweep],
) -> None:
    sweep = shared()
    sweep.start(3)
    doomed = sweep.in_fit()
    os.kill(doomed.user_attrs["process"], signal.SIGKILL)  # as the out-of-memory killer would
    outputs = sweep.finish()
    assert all(worker.returncode == 0 for worker in sweep.workers), outputs
    trials = sweep.check(workers=3)
    assert trials[doomed.number].state == State.FAIL
    assert "exit code -9" in trials[doomed.number].user_attrs["fail_reason"]
    sweep.retried(doomed.number)


def test_postgres_restarted_mid_sweep(shared: Callable[..., Sweep], postgres: Postgres) -> None:
    sweep = shared()
    sweep.start(3)
    sweep.in_fit()
    postgres.restart()
    outputs = sweep.finish()
    assert all(worker.returncode == 0 for worker in sweep.workers), outputs
    sweep.check(workers=3)


def test_the_mlflow_server_away_for_15_seconds(
    shared: Callable[..., Sweep], mlflow_server: MlflowServer
) -> None:
    sweep = shared(n_trials=4, epochs=6)
    sweep.start(3)
    sweep.in_fit()
    mlflow_server.restart_after(15)
    outputs = sweep.finish()
    assert all(worker.returncode == 0 for worker in sweep.workers), outputs
    sweep.check(workers=3)


def test_the_mlflow_server_away_too_long_stops_workers_in_one_line(
    shared: Callable[..., Sweep], mlflow_server: MlflowServer
) -> None:
    sweep = shared(n_trials=4, epochs=6, connect_seconds=4)
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
    # The trials it cut short are failed and queued; one worker with the server back finishes.
    (again,) = sweep.start(1)
    assert sweep.finish([again])[again.pid] is not None and again.returncode == 0
    sweep.check(workers=4)


def test_sigterm_fails_the_trial_for_the_others_and_ends_its_run_killed(
    shared: Callable[..., Sweep],
) -> None:
    sweep = shared()
    sweep.start(3)
    doomed = sweep.in_fit()
    victim = sweep.worker_of(doomed)
    victim.send_signal(signal.SIGTERM)
    assert victim.wait(timeout=15) == 130
    outputs = sweep.finish()
    assert all(w.returncode == 0 for w in sweep.workers if w is not victim), outputs
    trials = sweep.check(workers=3)
    assert trials[doomed.number].state == State.FAIL
    run = sweep.client.get_run(doomed.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"
    sweep.retried(doomed.number)


def test_bad_credentials_are_refused_in_one_line_and_store_nothing(
    shared: Callable[..., Sweep], mlflow_server: MlflowServer, postgres: Postgres
) -> None:
    sweep = shared(n_trials=2, epochs=1)
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


def test_several_workers_on_one_sqlite_file(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    project, env = sweep_project(tmp_path, own_mlflow=True, n_trials=5, epochs=2)
    sweep = Sweep(
        project, env, f"sqlite:///{project / 'optuna.db'}", "cifar10-cnn",
        MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]), n_trials=5,
    )  # fmt: skip
    sweep.start(3)
    for output in sweep.finish().values():
        assert "database is locked" not in output and "Traceback" not in output, output[-3000:]
    assert all(worker.returncode == 0 for worker in sweep.workers)
    sweep.check(workers=3)

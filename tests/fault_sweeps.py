"""The fault tests' sweep: three workers on PostgreSQL and an MLflow server with basic auth, the
checks every sweep must pass whatever happened to it, and the fixture that makes one."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import psutil
import yaml

from tests.helpers import STUDY, MlflowServer, Postgres, run_env, sweep_project

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
            lambda t: t.state == State.RUNNING and bool(t.intermediate_values),
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
            assert sorted(m.step for m in history) == list(
                range(1, len(trial.intermediate_values) + 1)
            )
        for trial in trials:
            if trial.state == State.FAIL and trial.user_attrs.get("mlflow_run_id"):
                run = self.client.get_run(trial.user_attrs["mlflow_run_id"])
                assert run.info.status in ("FAILED", "KILLED"), trial.number
        return trials

    def retried(self, number: int) -> optuna.trial.FrozenTrial:
        """The trial that finished in place of failed trial `number`: the last retry after it
        (Optuna names the chain's first failed trial in every retry of it)."""
        trials = self.trials()
        first = trials[number].system_attrs.get("failed_trial", number)
        retries = [
            t for t in trials if t.system_attrs.get("failed_trial") == first and t.number > number
        ]
        assert retries, describe(trials)
        retry = max(retries, key=lambda t: t.number)
        assert retry.state in FINISHED and retry.params == trials[number].params
        return retry


def describe(trials: list[optuna.trial.FrozenTrial]) -> list[tuple[int, str]]:
    return [(t.number, t.state.name) for t in trials]


def make_fault_sweep(
    tmp_path: Path, postgres: Postgres, mlflow_server: MlflowServer
) -> Callable[..., Sweep]:
    """Makes tiny sweeps on a fresh PostgreSQL database, each with its own experiment on the
    MLflow server (the conftest fixture `fault_sweep`)."""

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

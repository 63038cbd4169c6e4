"""Queued DVC experiments run in temporary copies; their runs land in the workspace's MLflow store."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import (
    run,
    tiny_project,
)

pytestmark = pytest.mark.slow


def test_queued_experiments_log_to_the_workspace_mlflow_store(tmp_path: Path) -> None:
    project, env = tiny_project(tmp_path, train={"epochs": 1})  # no MLFLOW_TRACKING_URI: default
    assert run(["dvc", "repro"], project, **env).returncode == 0
    run(["git", "add", "-A"], project)
    commit = run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline"], project
    )
    assert commit.returncode == 0, commit.stderr
    commit_sha = run(["git", "rev-parse", "HEAD"], project).stdout.strip()

    default = str(yaml.safe_load((project / "params.yaml").read_text())["train"]["learning_rate"])
    for learning_rate in ("0.031", "0.017"):
        queued = run(
            ["dvc", "exp", "run", "--queue", "-S", f"train.learning_rate={learning_rate}"],
            project,
            **env,
        )
        assert queued.returncode == 0, queued.stderr
    started = run(["dvc", "queue", "start", "-j", "2"], project, **env)
    assert started.returncode == 0, started.stderr
    deadline = time.monotonic() + 300
    while True:
        status = run(["dvc", "queue", "status"], project, **env).stdout
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, status
        time.sleep(2)
    assert status.count("Success") == 2, (
        status + run(["dvc", "queue", "logs", "-e"], project).stdout
    )
    run(["dvc", "queue", "stop", "--kill"], project)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cifar10-cnn")
    assert Path(experiment.artifact_location.removeprefix("file://")) == project / "mlruns"
    runs = client.search_runs([experiment.experiment_id])
    rates = sorted(r.data.params["train.learning_rate"] for r in runs)
    assert rates == sorted([default, "0.031", "0.017"])  # the workspace's run, both queued ones
    assert len({r.info.run_name for r in runs}) == 3  # told apart by name
    for run_ in runs:
        if run_.data.params["train.learning_rate"] != default:  # named after its experiment
            assert run_.info.run_name == run_.data.tags["dvc.experiment"] != ""
            assert run_.data.tags["dvc.baseline_rev"] == commit_sha
        assert run_.info.status == "FINISHED"
        assert "test_accuracy" in run_.data.metrics  # evaluate continued each run
        artifacts = {a.path for a in client.list_artifacts(run_.info.run_id)}
        assert "params.yaml" in artifacts
        assert Path(run_.info.artifact_uri.removeprefix("file://")).is_relative_to(
            project / "mlruns"
        )
    assert not list((project / ".dvc/tmp/exps").glob("tmp*/mlflow.db"))

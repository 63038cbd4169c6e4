"""From an MLflow run back to the `dvc repro` that re-creates it (pipeline.reproduce)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import flatten
from pipeline.params_edit import update_params_file
from tests.helpers import ROOT, free_port, run, tiny_project

pytestmark = pytest.mark.slow


def commit(project: Path, message: str) -> None:
    run(["git", "add", "-A"], project)
    done = run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message], project
    )
    assert done.returncode == 0, done.stderr


def repro(project: Path, env: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """A `dvc repro` that trains (a fresh clone has no run cache to restore outputs from);
    returns its MLflow run id and test metrics."""
    result = run(["dvc", "repro", "--no-run-cache"], project, **env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    run_id = json.loads((project / "models/mlflow_run.json").read_text())["run_id"]
    return run_id, json.loads((project / "metrics/test.json").read_text())


def reproduce(project: Path, env: dict[str, str], run_id: str) -> Any:
    return run(["python", "-m", "pipeline.reproduce", run_id], project, **env)


def test_a_run_reproduced_into_params_yaml_is_re_created_by_dvc_repro(tmp_path: Path) -> None:
    project, env = tiny_project(tmp_path, train={"deterministic": True})
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    # The shipped params.yaml, comments and all, with the tiny values written into it.
    params_file = project / "params.yaml"
    tiny = flatten(yaml.safe_load(params_file.read_text()))
    params_file.write_text((ROOT / "params.yaml").read_text())
    shipped = flatten(yaml.safe_load(params_file.read_text()))
    update_params_file(params_file, {k: v for k, v in tiny.items() if shipped[k] != v})
    commit(project, "tiny")
    first_run, first_metrics = repro(project, env)
    first_params = params_file.read_text()

    update_params_file(params_file, {"train.learning_rate": 0.031, "model.dense_dropout": 0.2})
    second_run, second_metrics = repro(project, env)
    assert second_metrics != first_metrics
    commit(project, "the second run")

    result = reproduce(project, env, first_run)
    assert result.returncode == 0, result.stderr
    assert params_file.read_text() == first_params  # comments and layout kept
    diff = run(["dvc", "params", "diff", "--json"], project)
    moved = json.loads(diff.stdout)["params.yaml"]
    assert set(moved) == {"train.learning_rate", "model.dense_dropout"}
    assert "2 keys moved" in result.stderr
    assert "data: the archive and the prepared splits match dvc.lock" in result.stderr
    assert "code: the run was made at commit" in result.stderr  # before the second commit

    third_run, third_metrics = repro(project, env)
    assert third_run not in (first_run, second_run)
    assert third_metrics == first_metrics  # exactly: every figure, every class

    again = reproduce(project, env, third_run)
    assert again.returncode == 0 and "0 keys moved" in again.stderr, again.stderr
    assert params_file.read_text() == first_params


def test_a_run_that_cannot_be_reproduced_is_refused_in_one_line(tmp_path: Path) -> None:
    project, env = tiny_project(tmp_path)
    params_file = project / "params.yaml"
    before = params_file.read_text()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    missing = reproduce(project, env, "0123456789abcdef0123456789abcdef")
    assert missing.returncode == 1
    assert (
        "MLflow run '0123456789abcdef0123456789abcdef': not found in sqlite:///" in missing.stderr
    )
    assert "Traceback" not in missing.stderr

    env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{free_port()}"
    away = reproduce(project, env, "0123456789abcdef0123456789abcdef")
    assert away.returncode == 1 and "Traceback" not in away.stderr
    assert f"MLflow tracking server {env['MLFLOW_TRACKING_URI']} unreachable" in away.stderr
    assert params_file.read_text() == before

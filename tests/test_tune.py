"""Sweeps: a real Optuna study on tiny data, SQLite storage, MLflow nesting, resume, hand-back."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import filelock
import optuna
import psycopg
import pytest
import yaml

from pipeline.config import params_from_dict
from pipeline.handback import apply_best
from pipeline.params_edit import update_params_file
from pipeline.study import queue_starting_points
from pipeline.tune import suggest
from tests.helpers import (
    ROOT,
    STUDY,
    SWEEP,
    copy_project,
    free_port,
    run,
    run_env,
    sweep_project,
    write_params,
)

pytestmark = pytest.mark.slow

State = optuna.trial.TrialState


def load(project: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY, storage=f"sqlite:///{project / 'optuna.db'}")


def mlflow_runs(project: Path) -> tuple[Any, list[Any], list[Any]]:
    """(client, parent runs, child runs) of the project's sweep experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cifar10-cnn")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_a_sweep_runs_n_trials_records_them_and_resumes_to_a_new_total(tmp_path: Path) -> None:
    project, env = sweep_project(tmp_path)
    result = run(["dvc", "repro", "sweep/dvc.yaml"], project, **env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    study = load(project)
    assert len(study.trials) == 3
    assert all(t.state in (State.COMPLETE, State.PRUNED) for t in study.trials)
    # Each trial trained in a process of its own, so its memory went back when it ended.
    processes = [t.user_attrs["process"] for t in study.trials]
    workers = {int(t.user_attrs["worker"].rsplit(":", 1)[1]) for t in study.trials}
    assert len(set(processes)) == 3 and not workers & set(processes) and len(workers) == 1
    assert all(t.user_attrs["fit"]["peak_rss_mb"] > 0 for t in study.trials)
    trials_csv = (project / "sweep/trials.csv").read_text().splitlines()
    assert trials_csv[0].split(",")[:8] == [
        "number", "state", "train.learning_rate", "train.momentum", "model.conv_dropout",
        "model.dense_dropout", "value", "duration_s",
    ]  # fmt: skip
    assert {"epochs_run", "fit_seconds", "peak_rss_mb"} <= set(trials_csv[0].split(","))
    assert len(trials_csv) == 4
    best = yaml.safe_load((project / "sweep/best_params.yaml").read_text())
    assert best["trial"] == study.best_trial.number
    assert best["val_accuracy"] == pytest.approx(study.best_value, abs=1e-6)
    assert set(best["params"]) == {
        "train.learning_rate", "train.momentum", "model.conv_dropout", "model.dense_dropout",
    }  # fmt: skip
    plots = {p.name for p in (project / "sweep/plots").iterdir()}
    assert {"optimization_history.png", "parallel_coordinate.png"} <= plots

    # The first trial measured params.yaml's own values: the sweep never hands back less.
    params_text = (project / "params.yaml").read_text()
    shipped = yaml.safe_load(params_text)
    assert study.trials[0].params == {
        key: shipped[key.split(".")[0]][key.split(".")[1]] for key in SWEEP["space"]
    }
    assert study.trials[0].user_attrs["starting_point"] == "params.yaml"
    assert study.best_value >= study.trials[0].value

    client, parents, children = mlflow_runs(project)
    (parent,) = parents
    assert parent.info.status == "FINISHED" and parent.info.run_name == f"sweep-{STUDY}"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    best = study.best_trial
    assert (
        parent.data.tags["best.train.learning_rate"] == f"{best.params['train.learning_rate']:.3g}"
    )
    for run_id in (parent.info.run_id, children[0].info.run_id):  # they trained nothing alone
        refused = run(["python", "-m", "pipeline.reproduce", run_id], project, **env)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert "pipeline.handback" in refused.stderr
    assert (project / "params.yaml").read_text() == params_text
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(study.best_value, abs=1e-6)
    assert {"trials.csv", "best_params.yaml", "plots"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    assert sorted(c.info.run_name for c in children) == ["trial-0", "trial-1", "trial-2"]
    for child in children:
        trial = study.trials[int(child.info.run_name.split("-")[1])]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        assert child.data.tags["optuna.state"] == trial.state.name
        assert float(child.data.params["train.learning_rate"]) == pytest.approx(
            trial.params["train.learning_rate"]
        )
        assert child.data.params["train.batch_size"] == "16"  # the rest of params.yaml, dotted
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")]
        assert steps == list(range(1, len(trial.intermediate_values) + 1))

    again = run(["dvc", "repro", "sweep/dvc.yaml"], project, **env)
    assert again.returncode == 0 and "Running stage" not in again.stdout
    # Where the study is stored and how long workers wait do not make the sweep stale.
    original = (project / "params.yaml").read_text()
    operational = {
        "tune.heartbeat_seconds": 2, "tune.grace_seconds": 30, "tune.connect_seconds": 5,
        "tune.timeout": 600, "tune.storage": "sqlite:///elsewhere.db",
    }  # fmt: skip
    for key, value in operational.items():
        update_params_file(project / "params.yaml", {key: value})
        status = run(["dvc", "status", "sweep/dvc.yaml", "--json"], project, **env)
        assert json.loads(status.stdout) == {}, (key, status.stdout)
        (project / "params.yaml").write_text(original)
    direct = run(["python", "-m", "pipeline.tune"], project, **env)
    assert direct.returncode == 0, direct.stderr
    assert "has 3 of 3 trials; nothing to run" in direct.stderr
    assert len(load(project).trials) == 3

    # n_trials is the total: raising it to 4 runs one more trial, under the same parent run.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tune"]["n_trials"] = 4
    write_params(project, params)
    more = run(["dvc", "repro", "sweep/dvc.yaml"], project, **env)
    assert more.returncode == 0, more.stderr[-3000:]
    assert len(load(project).trials) == 4
    _, parents, children = mlflow_runs(project)
    assert [p.info.run_id for p in parents] == [parent.info.run_id]
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)


def test_a_value_of_params_yaml_outside_the_space_is_drawn_and_the_sweep_says_so(
    params_dict: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The seed and fast recipes' weight decay 0 lies outside the space's log range: the first
    trial is params.yaml's other values, and the log and the trial's attributes say which
    key was drawn instead."""
    params_dict["train"]["weight_decay"] = 0.0
    params = params_from_dict(params_dict)
    study = optuna.create_study(direction="maximize")  # in memory: no training needed
    with caplog.at_level(logging.WARNING, logger="pipeline.study"):
        queue_starting_points(study, params)
    assert "train.weight_decay = 0.0 outside tune.space: the first trial draws it" in caplog.text
    trial = study.ask()
    values = suggest(trial, params)
    study.tell(trial, 0.5)
    current = params.flat()
    assert {k: v for k, v in values.items() if k != "train.weight_decay"} == {
        k: current[k] for k in params.tune.space if k != "train.weight_decay"
    }
    assert 1e-5 <= values["train.weight_decay"] <= 2e-3
    assert study.trials[0].user_attrs["drawn_instead"] == {"train.weight_decay": 0.0}


def test_a_hopeless_trial_is_pruned_and_a_nan_trial_is_recorded_and_passed(tmp_path: Path) -> None:
    project, env = sweep_project(
        tmp_path,
        epochs=4,
        space={
            "train.learning_rate": {"low": 1e-9, "high": 1e10, "log": True},
            "train.momentum": {"low": 0.0, "high": 0.95, "log": False},
            "model.conv_dropout": {"low": 0.0, "high": 0.5, "log": False},
            "model.dense_dropout": {"low": 0.0, "high": 0.5, "log": False},
        },
    )
    study = optuna.create_study(
        study_name=STUDY, storage=f"sqlite:///{project / 'optuna.db'}", direction="maximize"
    )
    common = {"train.momentum": 0.9, "model.conv_dropout": 0.0, "model.dense_dropout": 0.0}
    study.enqueue_trial({"train.learning_rate": 0.05, **common})  # learns the easy tiny classes
    study.enqueue_trial({"train.learning_rate": 1e-9, **common})  # learns nothing: pruned
    study.enqueue_trial({"train.learning_rate": 1e9, **common})  # diverges: NaN loss
    result = run(["python", "-m", "pipeline.tune"], project, **env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    trials = load(project).trials
    assert [t.state for t in trials] == [State.COMPLETE, State.PRUNED, State.PRUNED]
    assert trials[1].user_attrs["pruned_reason"].startswith("pruned after epoch")
    assert "the training loss became" in trials[2].user_attrs["pruned_reason"]
    _, _, children = mlflow_runs(project)
    by_name = {c.info.run_name: c for c in children}
    assert by_name["trial-1"].data.tags["optuna.state"] == "PRUNED"
    assert "loss became" in by_name["trial-2"].data.tags["optuna.pruned_reason"]
    assert all(c.info.status == "FINISHED" for c in children)
    table = (project / "sweep/trials.csv").read_text()
    assert table.count(",PRUNED,") == 2 and "pruned_reason" in table.splitlines()[0]
    assert "starting_point" not in table  # a study that had trials queues no starting points

    # The study's own dashboard, on its real storage, read back through its HTTP API.
    port = free_port()
    dashboard = subprocess.Popen(
        ["python", "-m", "pipeline.dashboard", "--port", str(port)], cwd=project,
        env=run_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    stalled = socket.socket()
    try:
        assert dashboard.stdout is not None
        assert dashboard.stdout.readline().strip().endswith(f"http://127.0.0.1:{port}/")
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies") as response:
                    studies = json.loads(response.read())["study_summaries"]
                break
            except OSError:
                assert dashboard.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        (summary,) = [s for s in studies if s["study_name"] == STUDY]
        url = f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}?after=0"
        with urllib.request.urlopen(url) as response:
            shown = json.loads(response.read())["trials"]
        assert [t["state"] for t in shown] == ["Complete", "Pruned", "Pruned"]
        # A client that stops reading its 6 MB download keeps the server inside the request's
        # write, where wsgiref would catch an interrupt raised there: Ctrl-C must still stop it.
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", port))
        stalled.sendall(
            b"GET /static/bundle.js HTTP/1.1\r\nHost: x\r\nAccept-Encoding: identity\r\n\r\n"
        )
        assert stalled.recv(12).endswith(b" 200")
    finally:
        os.killpg(dashboard.pid, signal.SIGINT)
        output = dashboard.communicate(timeout=30)[0]  # read to the end: a full pipe blocks it
        stalled.close()
    assert dashboard.returncode == 0, output[-3000:]


def test_the_dashboard_names_a_missing_study_and_a_taken_port(tmp_path: Path) -> None:
    write_params(tmp_path, yaml.safe_load((ROOT / "params.yaml").read_text()))
    dashboard = ["python", "-m", "pipeline.dashboard"]
    result = run(dashboard, tmp_path, PYTHONPATH=str(ROOT))
    assert result.returncode == 1 and "optuna.db: no study yet" in result.stderr, result.stderr
    optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run([*dashboard, "--port", str(port)], tmp_path, PYTHONPATH=str(ROOT))
    assert result.returncode == 1, result.stderr
    assert f"127.0.0.1:{port}: Address already in use; choose another" in result.stderr


def test_a_killed_sweep_resumes_and_its_dead_trial_is_failed_and_retried(tmp_path: Path) -> None:
    # No pruner, and 12 epochs: trial 1 must still be training when the test looks for it.
    project, env = sweep_project(tmp_path, n_trials=2, epochs=12, pruner="none")
    worker = subprocess.Popen(
        ["python", "-m", "pipeline.tune"], cwd=project, env=run_env(**env),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while True:  # kill it in the middle of its second trial
        assert worker.poll() is None and time.monotonic() < deadline
        if (project / "optuna.db").exists():
            try:
                trials = load(project).trials
            except Exception:  # the worker is still creating the study: poll again
                trials = []
            if (
                len(trials) >= 2
                and trials[1].state == State.RUNNING
                and bool(trials[1].intermediate_values)
            ):
                break
        time.sleep(0.1)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    assert load(project).trials[1].state == State.RUNNING  # nobody could end it
    time.sleep(4)  # longer than tune.grace_seconds: its heartbeat is now stale

    result = run(["python", "-m", "pipeline.tune"], project, **env)
    assert result.returncode == 0, result.stderr[-4000:]
    trials = load(project).trials
    states = [t.state for t in trials]
    assert states[1] == State.FAIL
    assert sum(s in (State.COMPLETE, State.PRUNED) for s in states) == 2
    assert State.RUNNING not in states
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retried) == 1 and retried[0].params == trials[1].params
    _, parents, children = mlflow_runs(project)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_name = {c.info.run_name: c for c in children}
    assert by_name["trial-1"].info.status == "FAILED"
    assert by_name["trial-1"].data.tags["optuna.state"] == "FAIL"
    assert all(c.info.status != "RUNNING" for c in children)
    assert len(children) == 3  # two good trials and the dead one


def test_the_best_values_go_into_params_yaml_keeping_everything_else(tmp_path: Path) -> None:
    project = copy_project(tmp_path / "project")
    before = (project / "params.yaml").read_text()
    best = tmp_path / "best.yaml"
    values = {
        "train.learning_rate": 0.04213987,
        "train.momentum": 0.87,
        "model.conv_dropout": 0.0001254991,
        "model.dense_dropout": 0.33,
    }
    best.write_text(
        yaml.safe_dump({"study": "s", "trial": 3, "val_accuracy": 0.7, "params": values})
    )
    apply_best(project / "params.yaml", best)
    after = (project / "params.yaml").read_text()
    changed = [
        (a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b
    ]
    assert len(changed) == 4
    for old, new in changed:
        assert old.split("#")[1:] == new.split("#")[1:]  # the comment stays, where it was
        assert old.find("#") == new.find("#")
    assert "  learning_rate: 0.0421 " in after and "  conv_dropout: 0.000125 " in after
    assert after.count("#") == before.count("#")
    diff = run(["dvc", "params", "diff", "--json"], project)
    assert diff.returncode == 0, diff.stderr
    moved = json.loads(diff.stdout)["params.yaml"]
    old_rate = yaml.safe_load(before)["train"]["learning_rate"]
    assert (moved["train.learning_rate"]["old"], moved["train.learning_rate"]["new"]) == (
        old_rate,
        0.0421,  # three significant figures
    )
    assert set(moved) == set(values)
    # The handback module is the same code path, driven by paths.best_params.
    (project / "sweep").mkdir(exist_ok=True)
    best.replace(project / "sweep/best_params.yaml")
    result = run(["python", "-m", "pipeline.handback"], project)
    assert result.returncode == 0, result.stderr


ELECT = """
from pipeline.config import load_params
from pipeline.study import open_study, shared_parent_run
params = load_params()
study, storage = open_study(params.tune)
print(shared_parent_run(study, storage, params))
"""


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_workers_starting_at_once_agree_on_one_parent_run(
    tmp_path: Path, database: str, request: pytest.FixtureRequest
) -> None:
    """Three workers start on a new study at the same moment: all take the same parent run, the
    only one of the study in MLflow, and the study's starting point is queued once. A parent
    run deleted by hand is replaced by the next worker; one that cannot take the study's lock
    in time says so. The storage holds the user's study alone."""
    from mlflow import MlflowClient

    project, env = sweep_project(tmp_path, n_trials=1, epochs=1)
    if database == "postgresql":
        env["OPTUNA_STORAGE"] = request.getfixturevalue("postgres").create_database("elect")
    storage = env.get("OPTUNA_STORAGE", f"sqlite:///{project / 'optuna.db'}")
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    client.create_experiment("cifar10-cnn", artifact_location=(project / "mlruns").as_uri())
    optuna.create_study(storage=storage, study_name=STUDY, direction="maximize")

    def elect(count: int) -> set[str]:
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", ELECT],
                cwd=project,
                env=run_env(**env),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(count)
        ]
        outputs = [worker.communicate(timeout=300) for worker in workers]
        failed = [
            err for worker, (_, err) in zip(workers, outputs, strict=True) if worker.returncode
        ]
        assert not failed, failed[0][-3000:]
        return {out.strip() for out, _ in outputs}

    chosen = elect(3)
    assert len(chosen) == 1
    parents = client.search_runs(
        [client.get_experiment_by_name("cifar10-cnn").experiment_id],
        f"tags.`optuna.study` = '{STUDY}'",
    )
    assert [run.info.run_id for run in parents] == list(chosen)
    study = optuna.load_study(study_name=STUDY, storage=storage)
    assert study.user_attrs["mlflow_parent_run_id"] in chosen
    assert [t.user_attrs["starting_point"] for t in study.trials] == ["params.yaml"]
    client.delete_run(next(iter(chosen)))
    replaced = elect(1)
    assert len(replaced) == 1 and replaced != chosen
    # A worker that cannot take the lock within tune.connect_seconds + tune.grace_seconds says so
    # and stops.
    client.delete_run(next(iter(replaced)))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tune"]["connect_seconds"] = 5
    write_params(project, params)
    with contextlib.ExitStack() as held:
        if database == "sqlite":
            held.enter_context(filelock.FileLock(project / "optuna.db.lock"))
        else:
            connection = held.enter_context(psycopg.connect(storage))  # in a transaction
            connection.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))", [f"optuna study {STUDY}"]
            )
        waited = subprocess.run(
            [sys.executable, "-c", ELECT], cwd=project, env=run_env(**env),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert waited.returncode == 1
    assert "held its lock for over 8 s (tune.connect_seconds + tune.grace_seconds)" in waited.stderr
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == [STUDY]


def take_queued_trials(tune: dict[str, Any], ready: Any, go: Any, taken: Any) -> None:
    """A worker's half of the race below: asks for 30 trials as soon as `go` is set."""
    from pipeline.config import TuneParams
    from pipeline.study import make_storage

    study = optuna.load_study(study_name=STUDY, storage=make_storage(TuneParams(**tune)))
    ready.set()
    go.wait()
    taken.put([study.ask().number for _ in range(30)])


def test_two_workers_on_one_sqlite_file_never_take_the_same_queued_trial(
    tmp_path: Path, params_dict: dict[str, Any]
) -> None:
    """SQLite ignores SELECT ... FOR UPDATE: without transactions that begin IMMEDIATE, both
    workers claimed some of the same WAITING trials (starting points, retries) and one crashed
    telling a trial the other had finished."""
    import multiprocessing

    from pipeline.config import TuneParams
    from pipeline.study import make_storage

    tune = {**params_dict["tune"], "storage": f"sqlite:///{tmp_path / 'race.db'}"}
    study = optuna.create_study(study_name=STUDY, storage=make_storage(TuneParams(**tune)))
    for x in range(60):
        study.enqueue_trial({"x": float(x)})
    context = multiprocessing.get_context("spawn")
    go, taken = context.Event(), context.Queue()
    readies = [context.Event() for _ in range(2)]
    workers = [
        context.Process(target=take_queued_trials, args=(tune, ready, go, taken))
        for ready in readies
    ]
    for worker in workers:
        worker.start()
    for ready in readies:
        assert ready.wait(timeout=120)
    go.set()
    first, second = (set(taken.get(timeout=120)) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
    assert len(first) == len(second) == 30 and not first & second


def test_a_study_database_of_another_optuna_version_is_refused_at_once(tmp_path: Path) -> None:
    import sqlite3

    from pipeline.errors import PipelineError
    from pipeline.study import open_study

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(storage=url, study_name=STUDY)
    with sqlite3.connect(tmp_path / "optuna.db") as database:  # as an older Optuna left it
        database.execute("UPDATE alembic_version SET version_num = 'v3.0.0.a'")
    params = params_from_dict(yaml.safe_load((ROOT / "params.yaml").read_text()))
    tune = params.tune.model_copy(update={"storage": url, "study_name": STUDY})
    started = time.monotonic()
    with pytest.raises(PipelineError, match=r"has schema v3\.0\.0\.a, .*optuna storage upgrade"):
        open_study(tune)
    assert time.monotonic() - started < tune.connect_seconds  # not waited out as an outage

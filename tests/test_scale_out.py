"""Scaling out: workers on PostgreSQL and an MLflow server, dead workers, SQLite workers,
MirroredStrategy on two logical CPUs, and data moving through a DVC remote."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from tests.conftest import (
    ROOT,
    MlflowServer,
    Postgres,
    copy_project,
    free_port,
    make_tiny_cifar,
    run,
    run_env,
    sha256_of,
    shrink,
    write_params,
    write_python_archive,
)
from tests.test_tune import STUDY, sweep_project

pytestmark = pytest.mark.slow
State = optuna.trial.TrialState
FINISHED = (State.COMPLETE, State.PRUNED)


def start_worker(project: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["python", "-m", "pipeline.tune"], cwd=project, env=run_env(**env), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def test_three_workers_share_one_study_and_survive_a_killed_worker(
    tmp_path: Path, postgres: Postgres, mlflow_server: MlflowServer
) -> None:
    project, env = sweep_project(tmp_path, own_mlflow=False, n_trials=6, epochs=6, pruner="none")
    storage = postgres.create_database("workers")
    env.update(OPTUNA_STORAGE=storage, MLFLOW_TRACKING_URI=mlflow_server.url)
    workers = [start_worker(project, env) for _ in range(3)]

    # Kill (SIGKILL) the worker of a trial that is in the middle of training.
    deadline, victim, doomed = time.monotonic() + 240, None, None
    while victim is None:
        assert time.monotonic() < deadline, "no trial reached its second epoch"
        assert all(w.poll() is None for w in workers), [
            w.communicate()[0][-2000:] for w in workers if w.poll() is not None
        ]
        try:
            trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials()
        except KeyError:  # not created yet
            trials = []
        for trial in trials:
            if trial.state == State.RUNNING and trial.user_attrs.get("epochs", 0) >= 1:
                pid = int(trial.user_attrs["worker"].rsplit(":", 1)[1])
                victim = next(w for w in workers if w.pid == pid)
                doomed = trial.number
                break
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    survivors = [w for w in workers if w is not victim]
    for worker in survivors:
        output = worker.communicate(timeout=420)[0]
        assert worker.returncode == 0, output[-4000:]

    trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials()
    assert sum(t.state in FINISHED for t in trials) == 6
    assert len({t.number for t in trials}) == len(trials)
    assert not [t for t in trials if t.state in (State.RUNNING, State.WAITING)]
    dead = trials[doomed]
    assert dead.state == State.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == doomed]
    assert retry.state in FINISHED and retry.params == dead.params
    surplus = [t for t in trials if t.state == State.FAIL and t.number != doomed]
    assert all(t.user_attrs["fail_reason"].startswith("surplus") for t in surplus)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("cifar10-cnn")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1, [p.info.run_name for p in parents]
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    by_trial = {c.info.run_name: c for c in children}
    assert len(by_trial) == len(children) == 7  # six finished trials and the dead one, once each
    assert by_trial[f"trial-{doomed}"].info.status == "FAILED"
    assert by_trial[f"trial-{retry.number}"].info.status == "FINISHED"


def test_several_workers_on_one_sqlite_file_work(tmp_path: Path) -> None:
    project, env = sweep_project(tmp_path, own_mlflow=False, n_trials=5, epochs=2)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    workers = [start_worker(project, env) for _ in range(3)]
    for worker in workers:
        output = worker.communicate(timeout=420)[0]
        assert worker.returncode == 0, output[-4000:]
        assert "database is locked" not in output
    trials = optuna.load_study(
        study_name=STUDY, storage=f"sqlite:///{project / 'optuna.db'}"
    ).get_trials()
    assert sum(t.state in FINISHED for t in trials) == 5


def test_unreachable_postgres_or_mlflow_server_give_a_clear_bounded_error(tmp_path: Path) -> None:
    project, env = sweep_project(tmp_path, own_mlflow=False, connect_seconds=3)
    dead_port = free_port()
    result = run(
        ["python", "-m", "pipeline.tune"], project, **env,
        OPTUNA_STORAGE=f"postgresql://pipeline:secret@127.0.0.1:{dead_port}/optuna",
        MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlflow.db'}",
    )  # fmt: skip
    assert result.returncode == 1
    assert (
        f"cannot open Optuna storage postgresql://pipeline:***@127.0.0.1:{dead_port}/optuna"
        in result.stderr
    )
    assert "gave up after tune.connect_seconds = 3 s" in result.stderr
    assert "secret" not in result.stderr and "Traceback" not in result.stderr

    result = run(
        ["python", "-m", "pipeline.tune"],
        project,
        **env,
        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{dead_port}",
    )
    assert result.returncode == 1
    assert f"MLflow tracking server http://127.0.0.1:{dead_port} unreachable" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project / "sweep/best_params.yaml").exists()


def test_mirrored_strategy_trains_on_two_logical_cpus(tmp_path: Path) -> None:
    script = """
import sys, numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import yaml
from pipeline.config import params_from_dict
from pipeline.dataset import Split
from pipeline.model import build_model
from pipeline.training import compile_model, distribution_strategy, fit, steps_per_epoch
raw = yaml.safe_load(open(sys.argv[1]))
raw["model"].update(conv_filters=[4, 8], dense_units=16)
raw["train"].update(distribute="mirrored", epochs=2, batch_size=16, warmup_epochs=0.5)
params = params_from_dict(raw)
strategy = distribution_strategy(params.train)
assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (96, 32, 32, 3), dtype=np.uint8)
labels = rng.integers(0, 10, 96).astype(np.uint8)
with strategy.scope():
    model = build_model(params.model)
    compile_model(model, params.train, steps_per_epoch(64, params.train))
history = fit(model, Split(images[:64], labels[:64]), Split(images[64:], labels[64:]), params.train, verbose=0)
assert len(history["loss"]) == 2 and all(np.isfinite(history["loss"]))
print("replicas", strategy.num_replicas_in_sync, "steps", int(model.optimizer.iterations.numpy()))
"""
    result = subprocess.run(
        [sys.executable, "-c", script, str(ROOT / "params.yaml")],
        capture_output=True,
        text=True,
        env=run_env(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # 64 images, global batch 16: 4 steps per epoch, each split over the two replicas.
    assert "replicas 2 steps 8" in result.stdout


def test_dvc_push_then_pull_in_a_fresh_clone_restores_data_and_model(tmp_path: Path) -> None:
    archive = write_python_archive(tmp_path / "cifar.tar.gz", make_tiny_cifar())
    project = copy_project(tmp_path / "project")
    params = shrink(yaml.safe_load((ROOT / "params.yaml").read_text()), sha256_of(archive))
    params["model"].update(conv_filters=[4, 8], dense_units=16)
    params["train"].update(epochs=1, batch_size=16, warmup_epochs=0.5)
    write_params(project, params)
    env = {
        "CIFAR10_URL": str(archive),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    assert run(["dvc", "repro"], project, **env).returncode == 0
    remote = tmp_path / "remote"
    assert run(["dvc", "remote", "add", "-d", "storage", str(remote)], project).returncode == 0
    pushed = run(["dvc", "push"], project)
    assert pushed.returncode == 0, pushed.stderr
    run(["git", "add", "-A"], project)
    assert (
        run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "results"],
            project,
        ).returncode
        == 0
    )

    clone = tmp_path / "clone"
    assert run(["git", "clone", "-q", str(project), str(clone)], tmp_path).returncode == 0
    pulled = run(["dvc", "pull"], clone)
    assert pulled.returncode == 0, pulled.stderr
    for path in (
        "models/model.keras",
        "data/prepared/train/images.npy",
        "data/raw/cifar-10.tar.gz",
    ):
        assert (clone / path).read_bytes() == (project / path).read_bytes(), path
    status = run(["dvc", "repro", "--dry"], clone, **env)
    assert status.returncode == 0, status.stderr
    assert "Running stage" not in status.stdout  # nothing to re-run after a pull

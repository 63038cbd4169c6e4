"""Scaling out: unreachable servers, MirroredStrategy on two logical CPUs, and data moving
through a DVC remote (faults of shared sweeps: test_sweep_faults.py, test_sweep_outages.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from tests.helpers import (
    ROOT,
    copy_project,
    free_port,
    make_tiny_cifar,
    run,
    run_env,
    sha256_of,
    shrink,
    sweep_project,
    write_params,
    write_python_archive,
)

pytestmark = pytest.mark.slow
State = optuna.trial.TrialState
FINISHED = (State.COMPLETE, State.PRUNED)


def start_worker(project: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["python", "-m", "pipeline.tune"], cwd=project, env=run_env(**env), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


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
from pipeline.splits import Split
from pipeline.model import build_model
from pipeline.training_loop import compile_model, distribution_strategy, fit, steps_per_epoch
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

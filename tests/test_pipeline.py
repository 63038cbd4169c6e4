"""The real `dvc repro` of all five stages on tiny data, and the MLflow record it leaves."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.helpers import (
    browser,
    free_port,
    run,
    run_env,
    tiny_project,
)

pytestmark = pytest.mark.slow


def new_project(tmp: Path, clone: bool = False, **train: Any) -> tuple[Path, dict[str, str]]:
    """A fresh tiny repository, and the environment its stages run in (its own MLflow store)."""
    project, env = tiny_project(tmp, train=train, clone=clone)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{project / 'mlflow.db'}"
    return project, env


def mlflow_client(project: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def run_id_of(project: Path) -> str:
    return str(json.loads((project / "models/mlflow_run.json").read_text())["run_id"])


@pytest.fixture(scope="module")
def repro(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str], str]]:
    """One real `dvc repro` of the five stages in a fresh clone (the committed outputs of the
    shipped recipe and of its sweep included), shared by the tests that only read its results."""
    project, env = new_project(tmp_path_factory.mktemp("repro"), clone=True)
    env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "0.2"  # MLflow's 10 s outlasts a tiny run
    result = run(["dvc", "repro"], project, **env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    yield project, env, result.stdout


def test_dvc_repro_runs_the_five_stages_then_nothing(
    repro: tuple[Path, dict[str, str], str],
) -> None:
    project, env, stdout = repro
    for stage in ("download", "preprocess", "build", "train", "evaluate"):
        assert f"Running stage '{stage}'" in stdout
    outputs = [
        "models/model.keras", "models/untrained.keras", "models/summary.txt",
        "metrics/train.json", "metrics/test.json", "metrics/history.csv",
        "plots/confusion.csv", "plots/confusion.png", "plots/misclassified.png",
    ]  # fmt: skip
    for output in outputs:
        assert (project / output).is_file(), output
    assert not (project / "models/checkpoint").exists()
    history = (project / "metrics/history.csv").read_text().splitlines()
    assert history[0] == "epoch,loss,accuracy,val_loss,val_accuracy,learning_rate"
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2"]
    test = json.loads((project / "metrics/test.json").read_text())
    assert set(test) >= {
        "test_loss",
        "test_accuracy",
        "macro_precision",
        "macro_recall",
        "macro_f1",
    }
    per_class = json.loads((project / "metrics/test_per_class.json").read_text())
    assert set(per_class["cat"]) == {"precision", "recall", "f1", "support"}
    assert len((project / "plots/confusion.csv").read_text().splitlines()) == 1 + 30

    again = run(["dvc", "repro"], project, **env)
    assert again.returncode == 0, again.stderr
    assert "Running stage" not in again.stdout

    # `dvc exp show` leads with the test figures, then the training's and its MLflow run; the
    # committed sweep's best trial follows, its values as params.yaml holds them; then params.
    # The data report and the per-class figures are a `dvc metrics show PATH` away.
    shown = run(["dvc", "exp", "show", "--csv"], project, **env)
    assert shown.returncode == 0, shown.stderr
    header, workspace = (line.split(",") for line in shown.stdout.splitlines()[:2])
    figures = header[header.index("parent") + 1 :]
    assert figures[:5] == [
        "test_loss",
        "test_accuracy",
        "macro_precision",
        "macro_recall",
        "macro_f1",
    ]
    train_figures = figures[5 : figures.index("mlflow_run_id") + 1]
    assert {"best_epoch", "best_val_accuracy", "best_val_loss"} <= set(train_figures)
    sweep = figures[len(train_figures) + 5 :]
    assert sweep[:4] == ["study", "trial", "val_accuracy", "params.train.learning_rate"]
    assert workspace[header.index("params.train.learning_rate")] == "0.0679"
    tuned = yaml.safe_load((project / "sweep/best_params.yaml").read_text())["params"]
    assert sweep[3 + len(tuned)].startswith("train.")  # then params.yaml's params
    assert not {"images", "per_class.cat", "cat.f1", "mean_rgb"} & set(header)
    assert run_id_of(project) in shown.stdout
    report = run(["dvc", "metrics", "show", "--json", "metrics/data.json"], project, **env)
    assert '"images": 30' in report.stdout.replace("\n", "")

    plots = run(["dvc", "plots", "show", "--json"], project, **env)
    assert plots.returncode == 0, plots.stderr
    shown = json.loads(plots.stdout)["data"]
    assert {"Loss", "Accuracy", "Confusion matrix (test)"} <= set(shown)


def test_a_key_reruns_only_the_stages_that_read_it(
    repro: tuple[Path, dict[str, str], str],
) -> None:
    """Operational settings (how to fetch the archive) rerun nothing; the registry's names rerun
    evaluate alone, never a 26-minute training; a training key reruns train."""
    from pipeline.params_edit import update_params_file

    project, env, _ = repro
    params_file = project / "params.yaml"
    original = params_file.read_text()
    expected = {
        "data.timeout": (61, set()),
        "data.retries": (9, set()),
        "mlflow.champion_alias": ("best", {"evaluate"}),
        "mlflow.registered_model": ("another-name", {"evaluate"}),
        "train.epochs": (3, {"train"}),
    }
    try:
        for key, (value, stale) in expected.items():
            update_params_file(params_file, {key: value})
            status = run(["dvc", "status", "--json", "dvc.yaml"], project, **env)
            assert status.returncode == 0, status.stderr
            assert set(json.loads(status.stdout)) == stale, (key, status.stdout)
            params_file.write_text(original)
    finally:
        params_file.write_text(original)


def test_the_mlflow_run_holds_params_metrics_tags_inputs_artifacts(
    repro: tuple[Path, dict[str, str], str],
) -> None:
    project, _, _ = repro
    client = mlflow_client(project)
    run_ = client.get_run(run_id_of(project))
    assert run_.info.status == "FINISHED"
    assert client.get_experiment(run_.info.experiment_id).name == "cifar10-cnn"
    params = run_.data.params
    shipped = yaml.safe_load((project / "params.yaml").read_text())
    assert params["train.learning_rate"] == str(shipped["train"]["learning_rate"])
    assert params["model.conv_dropout"] == str(shipped["model"]["conv_dropout"])
    assert params["train.augment.flip"] == str(shipped["train"]["augment"]["flip"])
    assert params["train.schedule"] == shipped["train"]["schedule"]
    assert params["preprocess.validation_size"] == "30"
    history = client.get_metric_history(run_.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2]
    for metric in ("loss", "accuracy", "val_loss", "learning_rate"):
        assert len(client.get_metric_history(run_.info.run_id, metric)) == 2
    metrics = run_.data.metrics
    for metric in (
        "test_loss",
        "test_accuracy",
        "macro_f1",
        "f1_cat",
        "recall_truck",
        "best_val_accuracy",
    ):
        assert metric in metrics
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}
    tags = run_.data.tags
    assert tags["data.train_dvc_hash"] == outs["data/prepared/train"]
    assert tags["data.archive_md5"] == outs["data/raw/cifar-10.tar.gz"]
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")
    inputs = {d.dataset.name: d.dataset.digest for d in run_.inputs.dataset_inputs}
    assert inputs == {
        split: outs[f"data/prepared/{split}"] for split in ("train", "validation", "test")
    }
    system = [key for key in metrics if key.startswith("system/")]  # MLflow's own sampling
    assert "system/cpu_utilization_percentage" in system, sorted(metrics)
    artifacts = {a.path for a in client.list_artifacts(run_.info.run_id)}
    assert {
        "params.yaml",
        "dvc.lock",
        "history.csv",
        "test.json",
        "train.json",
        "plots",
    } <= artifacts
    plots = {a.path for a in client.list_artifacts(run_.info.run_id, "plots")}
    assert plots == {"plots/confusion.png", "plots/misclassified.png"}


def test_the_model_is_registered_and_predicts_raw_pixels_through_pyfunc(
    repro: tuple[Path, dict[str, str], str],
) -> None:
    import mlflow

    project, env, _ = repro
    client = mlflow_client(project)
    champion = client.get_model_version_by_alias("cifar10-cnn", "champion")
    assert champion.run_id == run_id_of(project)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        model = mlflow.pyfunc.load_model("models:/cifar10-cnn@champion")
        signature = model.metadata.get_input_schema().inputs[0]
        assert signature.type == np.dtype(np.uint8) and signature.shape == (-1, 32, 32, 3)
        images = np.load(project / "data/prepared/test/images.npy")[:5]
        probabilities = np.asarray(model.predict(images))
        requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/cifar10-cnn@champion"))
    finally:
        mlflow.set_tracking_uri(None)
    # Pinned to the versions that trained it, and nothing of this project's own.
    pinned = set(requirements.read_text().split())
    for package in ("mlflow", "tensorflow", "keras", "numpy"):
        assert f"{package}=={importlib.metadata.version(package)}" in pinned
    assert not any(line.startswith("cifar10-pipeline") for line in pinned)
    assert probabilities.shape == (5, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_mlflow_models_serve_answers_raw_pixels_over_http(
    repro: tuple[Path, dict[str, str], str],
) -> None:
    project, env, _ = repro
    port = free_port()
    server = subprocess.Popen(
        ["mlflow", "models", "serve", "-m", "models:/cifar10-cnn@champion", "--env-manager",
         "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=project, env=run_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, server.stdout.read().decode() if server.stdout else ""
            assert time.monotonic() < deadline, "the scoring server did not start within 120 s"
            time.sleep(0.5)
        images = np.load(project / "data/prepared/test/images.npy")[:3]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": images.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = np.asarray(json.loads(response.read())["predictions"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert predictions.shape == (3, 10)
    np.testing.assert_allclose(predictions.sum(axis=1), 1.0, rtol=1e-4)


def wait_for_epoch(
    project: Path, epoch: int, process: subprocess.Popen[str], timeout: float = 120
) -> int:
    state = project / "models/checkpoint/state.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state.is_file():
            try:
                completed = int(json.loads(state.read_text())["epoch"])
            except (ValueError, KeyError):
                completed = 0  # being replaced right now
            if completed >= epoch:
                return completed
        assert process.poll() is None, "training ended before it could be interrupted"
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint of epoch {epoch} within {timeout} s")


def test_an_interrupted_repro_ends_its_run_killed_and_the_next_one_resumes(tmp_path: Path) -> None:
    # 15 epochs: ten or more left after the second kill, at epoch 5, however loaded the machine.
    project, env = new_project(tmp_path, epochs=15)
    assert run(["dvc", "repro", "build", "preprocess"], project, **env).returncode == 0

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["dvc", "repro"], cwd=project, env=run_env(**env), text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    # SIGTERM to the whole `dvc repro` (what a scheduler or a closed terminal sends).
    first = start()
    wait_for_epoch(project, 2, first)
    os.killpg(first.pid, signal.SIGTERM)
    output = first.communicate(timeout=60)[0]
    assert first.returncode != 0
    client = mlflow_client(project)
    (killed,) = client.search_runs([client.get_experiment_by_name("cifar10-cnn").experiment_id])
    assert killed.info.status == "KILLED", output[-2000:]
    assert not (project / "models/model.keras").exists()

    # SIGKILL: nothing can run on the way out; the run stays RUNNING until it is resumed.
    second = start()
    reached = wait_for_epoch(project, 5, second)
    os.killpg(second.pid, signal.SIGKILL)
    second.wait(timeout=30)
    assert client.get_run(killed.info.run_id).info.status == "RUNNING"

    third = run(["dvc", "repro"], project, **env)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    resumed_at = [line for line in third.stderr.splitlines() if "resuming from epoch" in line]
    assert resumed_at and int(resumed_at[0].split("resuming from epoch ")[1].split()[0]) >= reached
    assert run_id_of(project) == killed.info.run_id  # one run for the whole execution
    final = client.get_run(killed.info.run_id)
    assert final.info.status == "FINISHED"
    assert final.info.run_name == killed.info.run_name and final.info.run_name.startswith("train-")
    steps = [m.step for m in client.get_metric_history(killed.info.run_id, "val_accuracy")]
    assert sorted(steps) == list(range(1, 16))  # every epoch exactly once
    epochs = [
        line.split(",")[0]
        for line in (project / "metrics/history.csv").read_text().splitlines()[1:]
    ]
    assert epochs == [str(e) for e in range(1, 16)]


def test_a_nan_loss_fails_the_stage_cleanly(tmp_path: Path) -> None:
    project, env = new_project(tmp_path, learning_rate=1e9, epochs=5)
    result = run(["dvc", "repro", "train"], project, **env)
    assert result.returncode != 0
    assert (
        "the training loss became" in result.stderr and "lower train.learning_rate" in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not (project / "models/model.keras").exists()
    client = mlflow_client(project)
    (failed,) = client.search_runs([client.get_experiment_by_name("cifar10-cnn").experiment_id])
    assert failed.info.status == "FAILED"


@pytest.mark.parametrize(("command", "images"), [(["show"], 2), (["diff"], 4)])
def test_dvc_plots_draw_offline_in_a_headless_browser(
    repro: tuple[Path, dict[str, str], str], tmp_path: Path, command: list[str], images: int
) -> None:
    """After a plain `dvc repro` in a fresh clone (no make, no npm), `dvc plots show` and `dvc
    plots diff` (workspace against the committed run) write a page that Chromium, with every host
    name unresolvable, draws: three charts with their axes named, and the two images (of each
    revision, for diff)."""
    project, env, _ = repro
    result = run(["dvc", "plots", *command, "-o", str(tmp_path)], project, **env)
    assert result.returncode == 0, result.stderr
    page = tmp_path / "index.html"
    assert "<script src=" not in page.read_text()  # nothing to fetch
    drawn = subprocess.run(
        [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--host-resolver-rules=MAP * ~NOTFOUND",
         "--virtual-time-budget=20000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    dom = drawn.stdout
    assert dom.count('class="marks"') == 3, drawn.stderr[-2000:]  # Loss, Accuracy, Confusion
    for title in ("cross-entropy loss (train, validation)", "accuracy (train, validation)",
                  "predicted class", "epoch"):  # fmt: skip
        assert f">{title}</text>" in dom, title
    sources = re.findall(r'<img src="([^"]+)"', dom.rpartition("<body>")[2])
    assert len(sources) == images, sources
    for source in sources:  # each a PNG beside the page
        assert (tmp_path / source).read_bytes().startswith(b"\x89PNG"), source

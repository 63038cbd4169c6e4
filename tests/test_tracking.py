"""The MLflow module: run states, the champion alias, and evaluate's figures."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline import registry, tracking
from pipeline.config import ModelParams
from pipeline.evaluate import evaluate, flat_metrics, metrics_report
from pipeline.model import build_model
from tests.helpers import ROOT, run


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowClient]:
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        yield MlflowClient()
    finally:
        mlflow.set_tracking_uri(None)


def test_a_run_ends_finished_failed_or_killed(store: MlflowClient) -> None:
    with tracking.tracked_run("states") as run:
        pass
    assert store.get_run(run.info.run_id).info.status == "FINISHED"
    tags = store.get_experiment_by_name("states").tags  # MLflow's UI: the model-training view
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    with pytest.raises(ValueError), tracking.tracked_run("states") as run:
        raise ValueError("boom")
    assert store.get_run(run.info.run_id).info.status == "FAILED"
    with pytest.raises(KeyboardInterrupt), tracking.tracked_run("states") as run:
        raise KeyboardInterrupt
    assert store.get_run(run.info.run_id).info.status == "KILLED"
    # Resuming continues the same run and ends it again.
    with tracking.tracked_run("states", run_id=run.info.run_id) as resumed:
        assert resumed.info.run_id == run.info.run_id
    assert store.get_run(run.info.run_id).info.status == "FINISHED"


def _tag_each(uri: str, run_ids: list[str], barrier: Any, errors: Any) -> None:
    """A sweep worker's last writes: it tags each shared run in step with another."""
    mlflow.set_tracking_uri(uri)
    for run_id in run_ids:
        with mlflow.start_run(run_id=run_id):
            barrier.wait(timeout=60)
            try:
                tracking.set_tags({"best.trial": str(os.getpid())})
                tracking.end_abandoned_run(run_id, "FAILED", "its worker died")
            except Exception as error:  # reported to the test, which names it
                errors.put(f"{type(error).__name__}: {error}")


def test_workers_tagging_one_run_at_once_both_succeed(store: MlflowClient, tmp_path: Path) -> None:
    # Two workers that finish together tag the parent run with the best values (tags that do not
    # exist yet) at the same moment; MLflow's single-tag write fails the insert that loses.
    experiment = store.create_experiment("shared")
    runs = [store.create_run(experiment).info.run_id for _ in range(10)]
    context = multiprocessing.get_context("spawn")
    barrier, errors = context.Barrier(2), context.Queue()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    workers = [
        context.Process(target=_tag_each, args=(uri, runs, barrier, errors)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    assert errors.empty(), errors.get()
    for run_id in runs:
        tags = store.get_run(run_id).data.tags
        assert tags["best.trial"].isdigit()
        assert tags["optuna.state"] == "FAIL"


def test_the_champion_alias_moves_only_to_a_more_accurate_version(store: MlflowClient) -> None:
    model = build_model(
        ModelParams(
            conv_filters=(2, 2),
            dense_units=4,
            conv_dropout=0.0,
            dense_dropout=0.0,
            pixel_scale="unit",
            kernel_initializer="glorot_uniform",
            init_seed=0,
        )
    )
    example = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    outcomes = []
    for accuracy in (0.5, 0.4, 0.6, 0.6):
        with tracking.tracked_run("registry"):
            tracking.log_summary({"test_accuracy": accuracy})
            outcomes.append(
                registry.log_and_register_model(model, example, "tiny", "champion", accuracy)
            )
    assert [(o.version, o.champion) for o in outcomes] == [
        ("1", True), ("2", False), ("3", True), ("4", False),
    ]  # fmt: skip
    assert str(store.get_model_version_by_alias("tiny", "champion").version) == "3"
    assert store.get_model_version("tiny", "2").tags["test_accuracy"] == "0.400000"
    # Each move of the alias is on the versions: who held it from when until when.
    tags = {v: store.get_model_version("tiny", v).tags for v in ("1", "2", "3", "4")}
    assert tags["1"]["champion.replaced"] == "none" and tags["1"]["champion.replaced_by"] == "3"
    assert tags["3"]["champion.replaced"] == "1" and "champion.until" not in tags["3"]
    assert tags["1"]["champion.since"] <= tags["1"]["champion.until"] == tags["3"]["champion.since"]
    assert not any(key.startswith("champion.") for key in {**tags["2"], **tags["4"]})


def test_evaluation_figures_from_probabilities() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 2, 0])
    probabilities = np.full((6, 3), 0.1)
    probabilities[np.arange(6), predicted] = 0.8
    result = evaluate(probabilities, labels, 3)
    assert result.accuracy == pytest.approx(4 / 6)
    assert result.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    expected_loss = -np.mean(np.log(probabilities[np.arange(6), labels]))
    assert result.loss == pytest.approx(expected_loss)
    report: dict[str, Any] = metrics_report(result, ("a", "b", "c"))
    assert report["per_class"]["b"] == {
        "precision": 0.666667,
        "recall": 1.0,
        "f1": 0.8,
        "support": 2,
    }
    assert report["macro_recall"] == pytest.approx((0.5 + 1 + 0.5) / 3, abs=1e-6)
    flat = flat_metrics(report)
    assert flat["f1_b"] == 0.8 and flat["test_accuracy"] == pytest.approx(0.666667)


STOPPING_STAGE = """
import os, signal, threading, time
from pipeline import registry, tracking
from pipeline.stage_runner import run_stage, stop_point

def stage():
    with tracking.tracked_run("stops") as run:
        print(run.info.run_id, flush=True)
        # From another thread, as the kernel may deliver it to any thread (TensorFlow's).
        sender = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM))
        sender.start()
        sender.join()
        time.sleep(0.1)  # a write under way: the signal must not cut it
        tracking.log_summary({"written": 1.0})
        stop_point()
        tracking.log_summary({"after_the_stop": 1.0})

run_stage(stage)
"""


def test_a_signal_stops_the_stage_at_the_next_stop_point_never_inside_a_write(
    tmp_path: Path,
) -> None:
    result = run(["python", "-c", STOPPING_STAGE], tmp_path, PYTHONPATH=str(ROOT))
    assert result.returncode == 130, result.stderr[-3000:]
    assert "received SIGTERM: stopping at the next batch or step" in result.stderr
    assert "Traceback" not in result.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    stopped = client.get_run(result.stdout.split()[0])
    assert stopped.info.status == "KILLED"
    assert set(stopped.data.metrics) == {"written"}

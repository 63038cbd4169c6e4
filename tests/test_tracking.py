"""The MLflow module: run states, the champion alias, and evaluate's figures."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline import tracking
from pipeline.config import ModelParams
from pipeline.evaluate import evaluate, flat_metrics, metrics_report
from pipeline.model import build_model


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
                tracking.log_and_register_model(model, example, "tiny", "champion", accuracy)
            )
    assert [(o.version, o.champion) for o in outcomes] == [
        ("1", True), ("2", False), ("3", True), ("4", False),
    ]  # fmt: skip
    assert str(store.get_model_version_by_alias("tiny", "champion").version) == "3"
    assert store.get_model_version("tiny", "2").tags["test_accuracy"] == "0.400000"


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


def test_a_signal_during_an_mlflow_write_waits_for_the_write_to_end(
    request: pytest.FixtureRequest,
) -> None:
    # The signal is sent from another thread, as the kernel may deliver it to any thread that
    # does not block it (TensorFlow's do not); Python still runs its handler in the main thread.
    done: list[str] = []
    # Ctrl-C's own handler, whatever an earlier test or library left in its place.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    with pytest.raises(KeyboardInterrupt):
        with tracking.signals_held():
            sender = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT))
            sender.start()
            sender.join()
            time.sleep(0.05)  # the handler would run here, in the middle of the write
            done.append("write")
        done.append("after")  # never reached: the interrupt comes as the block ends
    assert done == ["write"]

"""The one module that talks to MLflow: runs, params, metrics, tags, datasets, models, registry.

Store: MLFLOW_TRACKING_URI when set; otherwise MLflow's own default in the working directory
(`mlflow.db`, artifacts in `mlruns/`), so `mlflow ui` started in the project root shows the runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import subprocess
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import mlflow
import mlflow.tensorflow
import numpy as np
import yaml
from mlflow import MlflowClient
from mlflow.data.numpy_dataset import from_numpy
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

from pipeline.config import Params, flatten, to_plain
from pipeline.dataset import Split

log = logging.getLogger(__name__)

DVC_LOCK = Path("dvc.lock")
MODEL_ARTIFACT = "model"


@contextlib.contextmanager
def tracked_run(
    experiment: str, run_id: str | None = None, run_name: str | None = None
) -> Iterator[Run]:
    """Starts (or, given `run_id`, resumes) a run and always ends it.

    FINISHED on success, KILLED on Ctrl-C or SIGTERM (the stages turn SIGTERM into
    KeyboardInterrupt), FAILED on any other exception. No run is left RUNNING.
    """
    mlflow.set_experiment(experiment)
    run = mlflow.start_run(run_id=run_id, run_name=run_name)
    log.info(
        "MLflow run %s (%s) in experiment %r at %s",
        run.info.run_id,
        "resumed" if run_id else "new",
        experiment,
        mlflow.get_tracking_uri(),
    )
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def log_params(params: Params) -> None:
    """The whole resolved params tree, with dotted keys: train.learning_rate, model.conv_dropout."""
    flat = {
        key: "null" if value is None else value for key, value in flatten(to_plain(params)).items()
    }
    mlflow.log_params(flat)


def log_epoch(epoch: int, logs: Mapping[str, float]) -> None:
    """One epoch's metrics, at step = epoch number (1-based)."""
    mlflow.log_metrics({key: float(value) for key, value in logs.items()}, step=epoch)


class EpochLogger(keras.callbacks.Callback):
    """Logs each completed epoch's metrics to the active run."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs:  # empty when the epoch diverged (see training.EpochRecorder)
            log_epoch(epoch + 1, logs)


def log_summary(metrics: Mapping[str, float]) -> None:
    """Figures that belong to the run rather than to an epoch (best epoch, test scores)."""
    mlflow.log_metrics({key: float(value) for key, value in metrics.items()})


def end_abandoned_run(run_id: str) -> None:
    """Ends as KILLED a run whose process died (SIGKILL) and that will not be resumed."""
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return
    if run.info.status == "RUNNING":
        client.set_terminated(run_id, "KILLED")
        log.info("ended abandoned MLflow run %s as KILLED", run_id)


def backfill_history(run_id: str, history: Mapping[str, list[float]]) -> None:
    """Logs the epochs of `history` that the run lacks (a run killed between checkpoint and log)."""
    client = MlflowClient()
    logged = {m.step for m in client.get_metric_history(run_id, "val_accuracy")}
    epochs = len(next(iter(history.values()), []))
    for epoch in range(1, epochs + 1):
        if epoch not in logged:
            log_epoch(epoch, {key: values[epoch - 1] for key, values in history.items()})


# --- provenance ---------------------------------------------------------------------------------


def dvc_hashes(lock: Path = DVC_LOCK) -> dict[str, str]:
    """DVC's hash of every stage output in dvc.lock, by path (a folder's ends in `.dir`)."""
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {
        out["path"]: out["md5"]
        for stage in stages.values()
        for out in stage.get("outs", [])
        if "md5" in out
    }


def git_state() -> dict[str, str]:
    """The commit and whether tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def log_provenance(params: Params) -> None:
    """Tags: git commit and dirtiness, the DVC hashes of the archive and the prepared data."""
    hashes = dvc_hashes()
    tags = git_state()
    tags["data.archive_md5"] = hashes.get(params.paths.archive.as_posix(), "unknown")
    for split in ("train", "validation", "test"):
        path = (params.paths.prepared / split).as_posix()
        tags[f"data.{split}_dvc_hash"] = hashes.get(path, "unknown")
    mlflow.set_tags(tags)


def log_dataset(split: Split, name: str, source: Path, context: str) -> None:
    """An MLflow dataset input whose digest is the split's DVC hash (the UI's Dataset column)."""
    digest = dvc_hashes().get(source.as_posix(), "unknown")
    with warnings.catch_warnings():  # "source can be interpreted in multiple ways": it is a path
        warnings.simplefilter("ignore", UserWarning)
        dataset = from_numpy(
            split.images, targets=split.labels, name=name, digest=digest, source=source.as_posix()
        )
    mlflow.log_input(dataset, context=context)


def log_artifacts(paths: list[Path], artifact_path: str | None = None) -> None:
    for path in paths:
        if path.is_file():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


# --- the model and the registry -----------------------------------------------------------------


def model_signature() -> ModelSignature:
    """uint8 images (any batch, 32, 32, 3) in; 10 float32 probabilities out."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 32, 32, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )


@dataclass(frozen=True)
class Registration:
    version: str
    champion: bool
    previous_champion: str | None


def log_and_register_model(
    model: keras.Model,
    example: np.ndarray,
    registered_model: str,
    alias: str,
    test_accuracy: float,
) -> Registration:
    """Logs the model, registers a new version, and moves `alias` to it if it is more accurate.

    The current champion's figure is its run's `test_accuracy` metric.
    """
    # mlflow.keras.log_model (3.17) writes the input example before creating its folder and
    # fails; the tensorflow flavour saves Keras 3 models natively and gives the same pyfunc.
    info = mlflow.tensorflow.log_model(
        model,
        name=MODEL_ARTIFACT,
        signature=model_signature(),
        input_example=example,
        registered_model_name=registered_model,
    )
    version = str(info.registered_model_version)
    client = MlflowClient()
    client.set_model_version_tag(registered_model, version, "test_accuracy", f"{test_accuracy:.6f}")
    previous = champion_accuracy(registered_model, alias)
    better = previous is None or test_accuracy > previous[1]
    if better:
        client.set_registered_model_alias(registered_model, alias, version)
        log.info(
            "%s version %s is the new @%s (test accuracy %.4f)",
            registered_model,
            version,
            alias,
            test_accuracy,
        )
    else:
        assert previous is not None
        log.info(
            "%s version %s (%.4f) does not beat @%s version %s (%.4f); alias unchanged",
            registered_model, version, test_accuracy, alias, previous[0], previous[1],
        )  # fmt: skip
    return Registration(version, better, None if previous is None else previous[0])


def champion_accuracy(registered_model: str, alias: str) -> tuple[str, float] | None:
    """(version, test accuracy) of the version holding `alias`, or None if no version does."""
    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(registered_model, alias)
    except MlflowException:
        return None
    metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
    accuracy = metrics.get("test_accuracy", -math.inf)
    return str(version.version), float(accuracy)

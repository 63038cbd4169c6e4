"""The model in MLflow's registry: logged with its signature, registered as a new version, and
the champion alias moved to it when it is more accurate (each move recorded in tags)."""

from __future__ import annotations

import importlib.metadata
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"


def model_signature() -> ModelSignature:
    """uint8 images (any batch, 32, 32, 3) in; 10 float32 probabilities out."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 32, 32, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]),
    )


def serving_requirements() -> list[str]:
    """The packages a served model needs, at this environment's versions (MLflow adds itself).

    Given explicitly, MLflow skips inferring them, which reloads the model in a subprocess (8.5 s
    of an evaluate on tiny data) and lists this project, which the float32 model never needs.
    """
    return [
        f"{name}=={importlib.metadata.version(name)}" for name in ("tensorflow", "keras", "numpy")
    ]


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
    # fails; the tensorflow flavour saves Keras 3 models natively and gives the same pyfunc. It
    # imports TensorFlow, so it is imported here, where a model is at hand anyway.
    import mlflow.tensorflow

    info = mlflow.tensorflow.log_model(
        model,
        name=MODEL_ARTIFACT,
        signature=model_signature(),
        input_example=example,
        registered_model_name=registered_model,
        pip_requirements=serving_requirements(),
    )
    version = str(info.registered_model_version)
    client = MlflowClient()
    client.set_model_version_tag(registered_model, version, "test_accuracy", f"{test_accuracy:.6f}")
    previous = champion_accuracy(registered_model, alias)
    better = previous is None or test_accuracy > previous[1]
    if better:
        client.set_registered_model_alias(registered_model, alias, version)
        record_alias_move(client, registered_model, alias, version, previous)
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


def record_alias_move(
    client: MlflowClient,
    registered_model: str,
    alias: str,
    version: str,
    previous: tuple[str, float] | None,
) -> None:
    """Tags both versions with the move, as MLflow keeps no history of an alias: the new one
    `<alias>.since` and `<alias>.replaced`, the old one `<alias>.until` and
    `<alias>.replaced_by`. The version that held the alias at time T is the one whose `since`
    is at or before T and whose `until` is absent or after it (ISO 8601 times, UTC)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set_model_version_tag(registered_model, version, f"{alias}.since", now)
    client.set_model_version_tag(
        registered_model, version, f"{alias}.replaced", previous[0] if previous else "none"
    )
    if previous is not None:
        client.set_model_version_tag(registered_model, previous[0], f"{alias}.until", now)
        client.set_model_version_tag(registered_model, previous[0], f"{alias}.replaced_by", version)


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
